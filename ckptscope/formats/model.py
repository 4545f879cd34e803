"""Plain records describing what a checkpoint holds, with no tensor bytes read.

Nothing here imports torch: listing a checkpoint must stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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
        # diffusion schedules kept by Stable Diffusion 1.x/2.x (ldm) models, EMA bookkeeping
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "decay",
        "num_updates",
        "pe",
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
    """One tensor as listed (a NamedTuple: listings build tens of thousands of these).

    Most tensors are a strided view of ``dtype`` elements in one byte range of one file. Two other
    shapes of data exist:
    - ``encoding`` set (a GGUF quantisation such as ``Q4_K``, see ``formats/gguf_decoding.py``): the
      storage's bytes are blocks that decode to ``dtype`` values, contiguous, ``numel`` of them;
      ``nbytes`` is then the physical size.
    - ``pieces`` set (a sharded torch.distributed.checkpoint tensor): the logical tensor is
      stitched from chunks, each a plain tensor at ``offsets`` in the logical one; ``storage``
      then names the first chunk's file with no bytes of its own.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    storage_offset: int  # in elements
    storage: StorageRef
    kind: str = "parameter"  # "parameter" | "buffer"
    alias_of: str | None = None  # first name (in file order) viewing exactly the same data
    kind_source: str = "name"  # "file": the file says parameter or buffer; "name": guessed from the name
    encoding: str | None = None  # how the stored bytes decode to ``dtype`` values (None: they are them)
    file_dtype: str | None = None  # the type as the file spells it, where that is not a torch dtype name
    pieces: tuple[Piece, ...] = ()
    quant: Quantization | None = None  # a torch quantized tensor: ``dtype`` is its integer representation

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        """Bytes the tensor's data takes in its file(s)."""
        if self.pieces:
            return sum(p.info.nbytes for p in self.pieces)
        if self.encoding is not None:
            return self.storage.nbytes
        return self.numel * self.itemsize

    @property
    def shown_dtype(self) -> str:
        """The dtype as listings show it: the file's own type name where it has one (GGUF)."""
        return self.file_dtype or self.dtype

    @property
    def plain(self) -> bool:
        """A strided view of ``dtype`` elements in one byte range (no decoding, no stitching, no
        dequantisation)."""
        return self.encoding is None and not self.pieces and self.quant is None

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
        return self._replace(name=name, alias_of=alias_of)


# TensorInfo's fields after ``kind`` at their defaults: a reader's hot loop builds a plain tensor
# as ``tuple.__new__(TensorInfo, (name, dtype, shape, stride, offset, storage, kind, *PLAIN_DEFAULTS))``,
# the tuple NamedTuple's own ``__new__`` makes, without its Python-level call per tensor
_AFTER_KIND: tuple[str, ...] = TensorInfo._fields[TensorInfo._fields.index("kind") + 1 :]
PLAIN_DEFAULTS: tuple[Any, ...] = tuple(TensorInfo._field_defaults[f] for f in _AFTER_KIND)


class Quantization(NamedTuple):
    """How a torch quantized tensor's integers map to values: x = (q - zero_point) * scale, per
    tensor, or per channel along ``axis`` with the scales and zero points as tensors of the file."""

    scheme: str  # torch's qscheme name: "per_tensor_affine", "per_channel_affine", ...
    qdtype: str  # "qint8", "quint8", "qint32"
    scale: float = 1.0  # per-tensor schemes
    zero_point: int = 0
    axis: int = 0  # per-channel schemes
    scales: TensorInfo | None = None
    zero_points: TensorInfo | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme, "qdtype": self.qdtype}
        if self.scales is None:
            out.update(scale=self.scale, zero_point=self.zero_point)
        else:
            out.update(axis=self.axis, channels=self.scales.numel)
        return out


class Piece(NamedTuple):
    """One chunk of a stitched tensor: where it sits in the logical tensor, and its data."""

    offsets: tuple[int, ...]  # index of the chunk's first element along each dimension
    info: TensorInfo  # the chunk as a plain tensor (its shape is the chunk's)


def byte_parts(info: TensorInfo) -> Iterator[TensorInfo]:
    """The tensor and every part its values are read from: a stitched tensor's chunks, a quantized
    tensor's scales and zero points (each a plain tensor with a storage of its own)."""
    yield info
    for piece in info.pieces:
        yield from byte_parts(piece.info)
    if info.quant is not None:
        for part in (info.quant.scales, info.quant.zero_points):
            if part is not None:
                yield from byte_parts(part)


@lru_cache(maxsize=4096)
def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


class OptimizerLayout(NamedTuple):
    """A ``torch.optim.Optimizer.state_dict()`` found in a file: where it lies (dotted, "" for the
    whole file) and its param groups' parameter ids, in order, spelt as its ``state`` keys are
    in tensor names (``state.0.exp_avg``). Read by ``optimizer_names`` to tell which parameter
    each state tensor belongs to (also across the files of a Trainer folder); not catalogued."""

    path: str
    groups: tuple[tuple[str, ...], ...]


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
    # dotted module path (from the file's top level) -> class of the pickled module found there
    module_types: dict[str, str] = field(default_factory=dict)
    pickle: dict[str, Any] | None = None  # the pickle report (pickled formats), see pickle_report.py
    # optimizer state tensor -> the parameter it belongs to (full names), see optimizer_names.py
    param_of: dict[str, str] = field(default_factory=dict)
    optimizers: list[OptimizerLayout] = field(default_factory=list)

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


def module_types_under(module_types: dict[str, str], root: str) -> dict[str, str]:
    """The module classes of a root's modules, keyed relative to it ("" for the root itself)."""
    if root == "":
        return dict(module_types)
    out: dict[str, str] = {}
    for path, cls in module_types.items():
        if path == root:
            out[""] = cls
        else:
            name = relative_name(path, root)
            if name is not None:
                out[name] = cls
    return out


def _tensor_to_json(t: TensorInfo) -> list[Any]:
    return [
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
        t.kind_source,
        t.encoding,
        t.file_dtype,
        [[list(p.offsets), _tensor_to_json(p.info)] for p in t.pieces],
        quant_to_json(t.quant, _tensor_to_json),
    ]


def quant_to_json(quant: Quantization | None, tensor: Callable[[TensorInfo], Any]) -> list[Any] | None:
    """A quantization as a JSON list; ``tensor`` encodes its scale and zero-point tensors."""
    if quant is None:
        return None
    return [
        quant.scheme,
        quant.qdtype,
        quant.scale,
        quant.zero_point,
        quant.axis,
        None if quant.scales is None else tensor(quant.scales),
        None if quant.zero_points is None else tensor(quant.zero_points),
    ]


def quant_from_json(data: list[Any] | None, tensor: Callable[[Any], TensorInfo]) -> Quantization | None:
    if data is None:
        return None
    scheme, qdtype, scale, zero_point, axis, scales, zero_points = data
    return Quantization(
        scheme,
        qdtype,
        scale,
        zero_point,
        axis,
        None if scales is None else tensor(scales),
        None if zero_points is None else tensor(zero_points),
    )


def _tensor_from_json(row: list[Any]) -> TensorInfo:
    name, dtype, shape, stride, soff, path, off, nbytes, key, kind, alias, kind_source, encoding, file_dtype, pieces = (
        row[:15]
    )
    return TensorInfo(
        name,
        dtype,
        tuple(shape),
        tuple(stride),
        soff,
        StorageRef(path, off, nbytes, key),
        kind,
        alias,
        kind_source,
        encoding,
        file_dtype,
        tuple(Piece(tuple(offsets), _tensor_from_json(info)) for offsets, info in pieces),
        quant_from_json(row[15], _tensor_from_json),
    )


def checkpoint_to_json(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "format": ckpt.format,
        "default_root": ckpt.default_root,
        "roots": [[r.path, r.tensor_count] for r in ckpt.roots],
        "metadata": ckpt.metadata,
        "warnings": ckpt.warnings,
        "files": ckpt.files,
        "module_types": ckpt.module_types,
        "pickle": ckpt.pickle,
        "param_of": ckpt.param_of,
        "optimizers": [[o.path, [list(g) for g in o.groups]] for o in ckpt.optimizers],
        "tensors": [_tensor_to_json(t) for t in ckpt.tensors],
    }


def checkpoint_from_json(data: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        format=data["format"],
        tensors=[_tensor_from_json(row) for row in data["tensors"]],
        roots=[RootInfo(p, n) for p, n in data["roots"]],
        default_root=data["default_root"],
        metadata=data["metadata"],
        warnings=data["warnings"],
        files=data["files"],
        module_types=data["module_types"],
        pickle=data["pickle"],
        param_of=data.get("param_of", {}),
        optimizers=[OptimizerLayout(p, tuple(tuple(g) for g in groups)) for p, groups in data.get("optimizers", [])],
    )
