"""Plain records describing what a checkpoint holds, with no tensor bytes read.

Nothing here imports torch: listing a checkpoint must stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from ckptscope.errors import UnknownRoot


@dataclass(frozen=True, slots=True)
class DType:
    name: str  # torch spelling, e.g. "bfloat16"
    itemsize: int
    category: str  # "float" | "int" | "uint" | "bool" | "complex"
    safetensors: str | None  # safetensors spelling, e.g. "BF16"


_DTYPE_LIST = [
    DType("float64", 8, "float", "F64"),
    DType("float32", 4, "float", "F32"),
    DType("float16", 2, "float", "F16"),
    DType("bfloat16", 2, "float", "BF16"),
    DType("float8_e4m3fn", 1, "float", "F8_E4M3"),
    DType("float8_e5m2", 1, "float", "F8_E5M2"),
    DType("int64", 8, "int", "I64"),
    DType("int32", 4, "int", "I32"),
    DType("int16", 2, "int", "I16"),
    DType("int8", 1, "int", "I8"),
    DType("uint64", 8, "uint", "U64"),
    DType("uint32", 4, "uint", "U32"),
    DType("uint16", 2, "uint", "U16"),
    DType("uint8", 1, "uint", "U8"),
    DType("bool", 1, "bool", "BOOL"),
    DType("complex64", 8, "complex", "C64"),
    DType("complex128", 16, "complex", None),
]

DTYPES: dict[str, DType] = {d.name: d for d in _DTYPE_LIST}
SAFETENSORS_DTYPES: dict[str, DType] = {d.safetensors: d for d in _DTYPE_LIST if d.safetensors}

MAX_DIMS = 64  # dimensions a tensor may declare, in any format

# Last name parts that mark a tensor as a buffer (state kept by a module that is not a parameter).
BUFFER_NAMES = frozenset(
    {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "position_ids",
        "token_type_ids",
        "inv_freq",
        "masked_bias",
        "_float_tensor",
        "relative_position_index",
        "attn_mask",
        "causal_mask",
    }
)


_FLOATING = frozenset(name for name, d in DTYPES.items() if d.category in ("float", "complex"))


def tensor_kind(name: str, dtype: str) -> str:
    """'buffer' for known buffer names and non-float tensors, else 'parameter'."""
    if dtype not in _FLOATING or name[name.rfind(".") + 1 :] in BUFFER_NAMES:
        return "buffer"
    return "parameter"


class StorageRef(NamedTuple):
    """Where a storage's bytes live: a byte range of one file."""

    path: str
    offset: int  # byte offset of the storage's first byte in the file
    nbytes: int
    key: str  # identifies the storage within the checkpoint (shared by aliases)


class TensorInfo(NamedTuple):
    """One tensor as listed (a NamedTuple: listings build tens of thousands of these)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    storage_offset: int  # in elements
    storage: StorageRef
    kind: str = "parameter"  # "parameter" | "buffer"
    alias_of: str | None = None  # first name (in file order) viewing exactly the same data

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def data_offset(self) -> int:
        """Byte offset in the file of the tensor's first element."""
        return self.storage.offset + self.storage_offset * self.itemsize

    @property
    def view_key(self) -> tuple[str, str, int, tuple[int, ...], tuple[int, ...], str]:
        return (
            self.storage.path,
            self.storage.key,
            self.storage_offset,
            self.shape,
            self.stride,
            self.dtype,
        )

    def renamed(self, name: str, alias_of: str | None = None) -> TensorInfo:
        return TensorInfo(
            name,
            self.dtype,
            self.shape,
            self.stride,
            self.storage_offset,
            self.storage,
            self.kind,
            alias_of,
        )


@lru_cache(maxsize=4096)
def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


@dataclass(frozen=True, slots=True)
class RootInfo:
    path: str  # dotted key path inside the file, "" for the whole file
    tensor_count: int


@dataclass(slots=True)
class Checkpoint:
    """Everything a reader learned about a file (or a sharded set) without reading tensor data."""

    format: str
    tensors: list[TensorInfo]  # full dotted names from the file's top level
    roots: list[RootInfo] = field(default_factory=list)
    default_root: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def resolve_root(self, root: str | None) -> str:
        return resolve_root(root, self.default_root, [r.path for r in self.roots])

    def root_tensors(self, root: str | None = None) -> list[TensorInfo]:
        """Tensors under ``root`` (the default root when None), named relative to it."""
        root = self.resolve_root(root)
        if root == "":
            return list(self.tensors)
        out: list[TensorInfo] = []
        for t in self.tensors:
            name = relative_name(t.name, root)
            if name is not None:
                out.append(t.renamed(name, relative_name(t.alias_of, root) if t.alias_of else None))
        return out


def resolve_root(root: str | None, default_root: str, known: Sequence[str]) -> str:
    """The root a request means: the default one for None, "" for the whole file, else one of the
    checkpoint's roots (UnknownRoot otherwise)."""
    root = default_root if root is None else root
    if root != "" and root not in known:
        listed = ", ".join(repr(path) for path in known) or "none"
        raise UnknownRoot(f"no root {root!r} in this checkpoint (roots: {listed})")
    return root


def relative_name(name: str, root: str) -> str | None:
    """``name`` relative to ``root``, or None when it lies outside it."""
    if root == "":
        return name
    return name[len(root) + 1 :] if name.startswith(root + ".") else None


def checkpoint_to_json(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "format": ckpt.format,
        "default_root": ckpt.default_root,
        "roots": [[r.path, r.tensor_count] for r in ckpt.roots],
        "metadata": ckpt.metadata,
        "warnings": ckpt.warnings,
        "files": ckpt.files,
        "tensors": [
            [
                t.name,
                t.dtype,
                list(t.shape),
                list(t.stride),
                t.storage_offset,
                t.storage.path,
                t.storage.offset,
                t.storage.nbytes,
                t.storage.key,
                t.kind,
                t.alias_of,
            ]
            for t in ckpt.tensors
        ],
    }


def checkpoint_from_json(data: dict[str, Any]) -> Checkpoint:
    tensors = [
        TensorInfo(name, dtype, tuple(shape), tuple(stride), soff, StorageRef(path, off, nbytes, key), kind, alias)
        for name, dtype, shape, stride, soff, path, off, nbytes, key, kind, alias in data["tensors"]
    ]
    return Checkpoint(
        format=data["format"],
        tensors=tensors,
        roots=[RootInfo(p, n) for p, n in data["roots"]],
        default_root=data["default_root"],
        metadata=data["metadata"],
        warnings=data["warnings"],
        files=data["files"],
    )
