"""Turn an unpickled torch object (nested dicts, lists, tensors, plain values) into a Checkpoint.

Training checkpoints nest the weights under ``state_dict``/``model``/``ema`` beside optimizer
state and plain values: every tensor-bearing dict becomes a selectable root, plain values
become metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from ckptscope.errors import CheckpointError

from .model import DTYPES, Checkpoint, RootInfo, StorageRef, TensorInfo, tensor_kind
from .torch_pickle import PickledStorage, PickledTensor

# Keys that hold the model weights in common trainer checkpoints, most likely first.
PREFERRED_ROOTS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "ema",
    "ema_state_dict",
    "generator",
)
MAX_ROOT_DEPTH = 2
MAX_METADATA_ITEMS = 2000
MAX_NESTING = 200
MAX_LEAVES = 2_000_000  # shared references can make a tiny pickle an exponentially large tree
MAX_SHARED_VISITS = 1000  # paths that may lead to one dict/list/tuple (real files: one or two)
MAX_NUMEL = 2**36  # elements in one tensor: far above any real tensor, far below an abuse

StorageLocator = Callable[[PickledStorage], StorageRef]


def _walk(obj: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield (key path, leaf) for every leaf, in order; dicts, lists and tuples holding containers
    or tensors are descended into. Iterative (a generator chain as deep as the nesting would make
    each step cost the depth), and bounded: a container shared under many paths is visited under
    each, so a tiny pickle can unfold to an exponentially large tree."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), obj)]
    visited = 0
    visits: dict[int, int] = {}  # container id -> times reached
    while stack:
        path, node = stack.pop()
        visited += 1
        if visited > MAX_LEAVES:
            raise CheckpointError("limit_exceeded", f"checkpoint object has more than {MAX_LEAVES} entries")
        if len(path) > MAX_NESTING:
            raise CheckpointError("corrupt_pickle", "checkpoint object nests too deeply")
        if isinstance(node, dict | list | tuple) and node:
            seen = visits[id(node)] = visits.get(id(node), 0) + 1
            if seen > MAX_SHARED_VISITS:
                raise CheckpointError(
                    "limit_exceeded",
                    f"one container of the checkpoint is reached by more than {MAX_SHARED_VISITS} paths "
                    "(shared references that unfold exponentially)",
                )
        if isinstance(node, dict):
            children = [((*path, str(key)), value) for key, value in node.items()]
        elif isinstance(node, list | tuple) and any(isinstance(v, dict | list | tuple | PickledTensor) for v in node):
            children = [((*path, str(index)), value) for index, value in enumerate(node)]
        else:
            yield path, node
            continue
        stack.extend(reversed(children))


def plain_value(value: Any) -> Any:
    """A JSON-safe rendering of a non-tensor leaf (attacker text stays text)."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            # str() of a huge int is quadratic (and refused past 4300 digits)
            return str(value) if value.bit_length() <= 256 else f"<int of {value.bit_length()} bits>"
        return value[:1000] if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple | set | frozenset) and len(value) <= 64:
        items = [plain_value(v) for v in value]
        if all(not isinstance(v, dict | list) for v in items):
            return items
    if isinstance(value, list | tuple | set | frozenset):
        return f"<{type(value).__name__} of {len(value)} items>"
    return f"<{type(value).__name__}>"


def _choose_default_root(obj: Any, roots: list[RootInfo]) -> str:
    paths = {r.path for r in roots}
    if isinstance(obj, dict):
        for key in PREFERRED_ROOTS:
            if key in paths:
                return key
    return ""


def mark_aliases(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """Point later names that view exactly the same data at the first such name."""
    first: dict[tuple[Any, ...], str] = {}
    out: list[TensorInfo] = []
    for t in tensors:
        owner = first.setdefault(t.view_key, t.name)
        out.append(t if owner == t.name else t.renamed(t.name, owner))
    return out


def check_view_in_storage(name: str, t: PickledTensor | TensorInfo, storage_bytes: int) -> None:
    """Refuse a view whose elements would fall outside its storage."""
    itemsize = DTYPES[t.dtype].itemsize
    if any(s == 0 for s in t.shape):
        return
    last = t.storage_offset + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride, strict=True))
    if (last + 1) * itemsize > storage_bytes:
        raise CheckpointError("corrupt_pickle", f"tensor {name!r} views elements beyond the end of its storage")


def build_checkpoint(obj: Any, fmt: str, locate: StorageLocator, files: list[str]) -> Checkpoint:
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    bearing: dict[str, int] = {}
    if isinstance(obj, PickledTensor):
        obj = {"tensor": obj}
    for path, leaf in _walk(obj):
        name = ".".join(path)
        if isinstance(leaf, PickledTensor):
            if leaf.dtype not in DTYPES:
                raise CheckpointError("unsupported_dtype", f"tensor {name!r} has unsupported dtype {leaf.dtype}")
            if math.prod(leaf.shape) > MAX_NUMEL:
                raise CheckpointError(
                    "limit_exceeded", f"tensor {name!r} declares {math.prod(leaf.shape)} elements (limit 2**36)"
                )
            ref = locate(leaf.storage)
            storage_offset = (
                leaf.storage_offset
                + leaf.storage.view_offset
                * (DTYPES[leaf.storage.dtype].itemsize if leaf.storage.dtype else 1)
                // DTYPES[leaf.dtype].itemsize
            )
            info = TensorInfo(
                name=name,
                dtype=leaf.dtype,
                shape=leaf.shape,
                stride=leaf.stride,
                storage_offset=storage_offset,
                storage=ref,
                kind=tensor_kind(name, leaf.dtype),
            )
            check_view_in_storage(name, info, ref.nbytes)
            tensors.append(info)
            for depth in range(0, min(len(path) - 1, MAX_ROOT_DEPTH) + 1):
                prefix = ".".join(path[:depth])
                bearing[prefix] = bearing.get(prefix, 0) + 1
        elif len(metadata) < MAX_METADATA_ITEMS:
            metadata[name or "value"] = plain_value(leaf)
    if not tensors:
        raise CheckpointError("no_tensors", "the checkpoint holds no tensors")
    roots = [RootInfo(path, count) for path, count in bearing.items()]
    roots.sort(key=lambda r: (r.path.count("."), r.path != "", r.path))
    return Checkpoint(
        format=fmt,
        tensors=mark_aliases(tensors),
        roots=roots,
        default_root=_choose_default_root(obj, roots),
        metadata=metadata,
        files=files,
    )
