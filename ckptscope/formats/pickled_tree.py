"""Turn an unpickled torch object (nested dicts, lists, tensors, plain values) into a Checkpoint.

Training checkpoints nest the weights under ``state_dict``/``model``/``ema`` beside optimizer
state and plain values: every tensor-bearing dict becomes a selectable root, plain values
become metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ckptscope.errors import CheckpointError

from .model import (
    DTYPES,
    Checkpoint,
    OptimizerLayout,
    Quantization,
    RootInfo,
    StorageRef,
    TensorInfo,
    tensor_kind,
)
from .optimizer_names import name_optimizer_state
from .pickle_objects import InertObject, PickledModule, render
from .torch_pickle import META, PickledQuant, PickledStorage, PickledTensor

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


class _Leaf(NamedTuple):
    path: tuple[str, ...]
    value: Any
    kind: str | None  # "parameter" | "buffer" when the file says so (a module's state)
    root_limit: int | None = None  # inside a pickled module: the deepest prefix that may be a root
    in_dict: bool = False  # a value of a dict (a state dict's entry)


def _holds_tensors(node: Any, memo: dict[int, bool]) -> bool:
    """Whether a tensor or a pickled module lies anywhere inside ``node`` (each part looked at once)."""
    if isinstance(node, PickledTensor | PickledModule):
        return True
    if not isinstance(node, dict | list | tuple | InertObject):
        return False
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = False  # a container inside itself
    if isinstance(node, dict):
        parts: Any = node.values()
    elif isinstance(node, InertObject):
        parts = [*(v for _, v in node.iter_fields()), *(node.appended or ())]
    else:
        parts = node
    found = any(_holds_tensors(v, memo) for v in parts)
    memo[id(node)] = found
    return found


def _walk(obj: Any, module_types: dict[str, str]) -> Iterator[_Leaf]:
    """Yield every leaf with its key path, in order. Dicts are descended into; lists, tuples and
    inert objects when they hold tensors; a pickled module yields its parameters, persistent
    buffers and submodules in ``state_dict`` order (its class goes to ``module_types``).
    Iterative (a generator chain as deep as the nesting would make each step cost the depth), and
    bounded: a container shared under many paths is visited under each, so a tiny pickle can
    unfold to an exponentially large tree."""
    stack: list[_Leaf] = [_Leaf((), obj, None, None)]
    visited = 0
    visits: dict[int, int] = {}  # container id -> times reached
    memo: dict[int, bool] = {}
    while stack:
        leaf = stack.pop()
        path, node, limit = leaf.path, leaf.value, leaf.root_limit
        visited += 1
        if visited > MAX_LEAVES:
            raise CheckpointError("limit_exceeded", f"checkpoint object has more than {MAX_LEAVES} entries")
        if len(path) > MAX_NESTING:
            raise CheckpointError("corrupt_pickle", "checkpoint object nests too deeply")
        if node.__class__ is PickledTensor:  # most leaves: none of the container tests below apply
            yield leaf
            continue
        if isinstance(node, dict | list | tuple | InertObject | PickledModule) and node:
            seen = visits[id(node)] = visits.get(id(node), 0) + 1
            if seen > MAX_SHARED_VISITS:
                raise CheckpointError(
                    "limit_exceeded",
                    f"one container of the checkpoint is reached by more than {MAX_SHARED_VISITS} paths "
                    "(shared references that unfold exponentially)",
                )
        children: list[_Leaf]
        if isinstance(node, PickledModule):
            module_types[".".join(path)] = node.cls
            inner = len(path) if limit is None else limit  # a module's insides are not roots
            children = [_Leaf((*path, k), v, "parameter", inner) for k, v in node.parameters.items() if v is not None]
            children += [
                _Leaf((*path, k), v, "buffer", inner)
                for k, v in node.buffers.items()
                if v is not None and k not in node.non_persistent
            ]
            children += [_Leaf((*path, k), v, None, inner) for k, v in node.modules.items() if v is not None]
        elif isinstance(node, dict):
            children = [_Leaf((*path, str(key)), value, None, limit, True) for key, value in node.items()]
        elif isinstance(node, InertObject) and _holds_tensors(node, memo):
            children = [_Leaf((*path, key), value, None, limit) for key, value in node.iter_fields()]
            children += [_Leaf((*path, str(i)), value, None, limit) for i, value in enumerate(node.appended or ())]
        elif isinstance(node, list | tuple) and any(
            isinstance(v, dict | list | tuple | PickledTensor | PickledModule) or _holds_tensors(v, memo) for v in node
        ):
            children = [_Leaf((*path, str(index)), value, None, limit) for index, value in enumerate(node)]
        else:
            yield leaf
            continue
        stack.extend(reversed(children))


plain_value = render  # the rendering of a non-tensor value (shared with the sharded index reader)


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


def _kinds(leaves: list[tuple[_Leaf, TensorInfo, bool]]) -> list[TensorInfo]:
    """Each tensor's kind: the file's word where it has one (a pickled module's ``_parameters`` or
    ``_buffers``; an ``nn.Parameter`` beside plain tensors in one dict, as ``state_dict(keep_vars=
    True)`` saves them), else the guess from its name and dtype."""
    with_parameters = {
        leaf.path[:-1] for leaf, _, is_parameter in leaves if is_parameter and leaf.kind is None and leaf.in_dict
    }
    out = []
    for leaf, info, is_parameter in leaves:
        if leaf.kind is not None:
            out.append(info._replace(kind=leaf.kind, kind_source="file"))
        elif is_parameter:
            out.append(info._replace(kind="parameter", kind_source="file"))
        elif leaf.in_dict and info.quant is None and leaf.path[:-1] in with_parameters:
            out.append(info._replace(kind="buffer", kind_source="file"))
        else:
            out.append(info)
    return out


def _is_optimizer(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"), list)
    )


def _optimizers(obj: Any) -> list[tuple[tuple[str, ...], dict[Any, Any]]]:
    """The ``torch.optim.Optimizer.state_dict()``s near the top of a training checkpoint (under
    ``optimizer``, Lightning's ``optimizer_states`` list, ...; the whole object for a Trainer's
    ``optimizer.pt``), with their key paths."""
    if _is_optimizer(obj):
        return [((), obj)]
    found: list[tuple[tuple[str, ...], dict[Any, Any]]] = []
    level: list[tuple[tuple[str, ...], Any]] = [((), obj)]
    for _ in range(3):
        below: list[tuple[tuple[str, ...], Any]] = []
        for path, node in level:
            items = (
                node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list | tuple) else ()
            )
            for key, value in items:
                if _is_optimizer(value):
                    found.append(((*path, str(key)), value))
                elif isinstance(value, dict | list | tuple) and len(found) < 4:
                    below.append(((*path, str(key)), value))
        level = below[:64]
    return found


def _optimizer_layout(path: tuple[str, ...], optimizer: dict[Any, Any]) -> OptimizerLayout | None:
    """Where an optimizer lies and its groups' parameter ids (as its state keys are named)."""
    groups: list[tuple[str, ...]] = []
    for group in optimizer["param_groups"]:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            return None
        groups.append(tuple(str(p) for p in params))
    return OptimizerLayout(".".join(path), tuple(groups))


def _optimizer_evidence(
    obj: Any, tensors: list[TensorInfo], root: str
) -> tuple[list[TensorInfo], dict[str, str], list[OptimizerLayout]]:
    """What the optimizers saved beside the weights tell (``optimizer_names``): their state
    tensors are buffers, and where their parameters match the weights root's tensors in one
    way only, those are parameters and each state tensor's parameter is known."""
    layouts = [o for path, opt in _optimizers(obj) if (o := _optimizer_layout(path, opt)) is not None]
    if not layouts:
        return tensors, {}, []
    tensors, param_of = name_optimizer_state(tensors, layouts, root)
    return tensors, param_of, layouts


def _tensor_info(
    name: str,
    leaf: PickledTensor,
    locate: StorageLocator,
    files: list[str],
    fitting: set[tuple[Any, ...]] | None = None,
) -> TensorInfo:
    """``fitting``: the views (dtype, shape, stride, offset, storage bytes) already found to lie
    within their storage (a state dict repeats a few; the check is a function of these alone)."""
    if leaf.dtype not in DTYPES:
        raise CheckpointError("unsupported_dtype", f"tensor {name!r} has unsupported dtype {leaf.dtype}")
    if math.prod(leaf.shape) > MAX_NUMEL:
        raise CheckpointError(
            "limit_exceeded", f"tensor {name!r} declares {math.prod(leaf.shape)} elements (limit 2**36)"
        )
    kind = tensor_kind(name, "float32" if leaf.quant is not None else leaf.dtype)
    if leaf.storage is META:  # a meta-device tensor: listed, no data
        storage = StorageRef(files[0], 0, 0, f"meta:{name}")
        return TensorInfo(name, leaf.dtype, leaf.shape, leaf.stride, 0, storage, kind, encoding="meta")
    ref = locate(leaf.storage)
    storage_offset = (
        leaf.storage_offset
        + leaf.storage.view_offset
        * (DTYPES[leaf.storage.dtype].itemsize if leaf.storage.dtype else 1)
        // DTYPES[leaf.dtype].itemsize
    )
    info = TensorInfo(name, leaf.dtype, leaf.shape, leaf.stride, storage_offset, ref, kind)
    if fitting is None:
        check_view_in_storage(name, info, ref.nbytes)
    else:
        view = (leaf.dtype, leaf.shape, leaf.stride, storage_offset, ref.nbytes)
        if view not in fitting:
            check_view_in_storage(name, info, ref.nbytes)
            fitting.add(view)
    if leaf.quant is not None:
        info = info._replace(file_dtype=leaf.quant.qdtype, quant=_quantization(name, leaf.quant, locate, files))
    return info


def _quantization(name: str, q: PickledQuant, locate: StorageLocator, files: list[str]) -> Quantization:
    if q.scales is None or q.zero_points is None:
        if not math.isfinite(q.scale) or q.scale <= 0:
            raise CheckpointError("corrupt_pickle", f"quantized tensor {name!r} has a scale that is not positive")
        return Quantization(q.scheme, q.qdtype, q.scale, q.zero_point)
    scales = _tensor_info(f"{name} (scales)", q.scales, locate, files)
    zero_points = _tensor_info(f"{name} (zero points)", q.zero_points, locate, files)
    if DTYPES[scales.dtype].category != "float" or DTYPES[zero_points.dtype].category == "complex":
        raise CheckpointError("corrupt_pickle", f"quantized tensor {name!r} has scales that are not floats")
    return Quantization(q.scheme, q.qdtype, axis=q.axis, scales=scales, zero_points=zero_points)


def build_checkpoint(obj: Any, fmt: str, locate: StorageLocator, files: list[str]) -> Checkpoint:
    leaves: list[tuple[_Leaf, TensorInfo, bool]] = []
    metadata: dict[str, Any] = {}
    bearing: dict[str, int] = {}
    module_types: dict[str, str] = {}
    # the roots a tensor counts towards follow from its parent's path: worked out once per parent
    prefixes_of: dict[tuple[tuple[str, ...], int | None], list[str]] = {}
    fitting: set[tuple[Any, ...]] = set()
    if isinstance(obj, PickledTensor):
        obj = {"tensor": obj}
    for leaf in _walk(obj, module_types):
        path, value = leaf.path, leaf.value
        name = ".".join(path)
        if isinstance(value, PickledTensor):
            leaves.append((leaf, _tensor_info(name, value, locate, files, fitting), value.is_parameter))
            parent = (path[:-1], leaf.root_limit)
            prefixes = prefixes_of.get(parent)
            if prefixes is None:
                deepest = min(len(path) - 1, MAX_ROOT_DEPTH)
                if leaf.root_limit is not None:
                    deepest = min(deepest, leaf.root_limit)
                prefixes = prefixes_of[parent] = [".".join(path[:depth]) for depth in range(0, deepest + 1)]
            for prefix in prefixes:
                bearing[prefix] = bearing.get(prefix, 0) + 1
        elif len(metadata) < MAX_METADATA_ITEMS:
            metadata[name or "value"] = plain_value(value)
    if not leaves:  # the values read are still worth showing where this file is one part of many
        error = CheckpointError("no_tensors", "the checkpoint holds no tensors")
        error.extra["metadata"] = metadata
        raise error
    roots = [RootInfo(path, count) for path, count in bearing.items()]
    roots.sort(key=lambda r: (r.path.count("."), r.path != "", r.path))
    default_root = _choose_default_root(obj, roots)
    tensors, param_of, optimizers = _optimizer_evidence(obj, mark_aliases(_kinds(leaves)), default_root)
    return Checkpoint(
        format=fmt,
        tensors=tensors,
        param_of=param_of,
        optimizers=optimizers,
        roots=roots,
        default_root=default_root,
        metadata=metadata,
        files=files,
        module_types=module_types,
    )
