"""Reading PyTorch's pickles (``data.pkl``, the legacy format's pickles) without running them.

The pickle is first unpickled into an inert graph (``pickle_graph``: globals, calls and states
become records; nothing is imported or called), then the graph is interpreted: the few globals a
tensor state dict names become their meaning here (pure functions building records, immutable
markers), every other global refuses the file with a message naming it, and tensors are
validated once, from the finished graph. No torch import is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from ckptscope.errors import CheckpointError

from .model import DTYPES, MAX_DIMS
from .pickle_graph import Built, Call, Global, Persistent, SetRecord, WorkBudget, unpickle_graph

# Legacy typed storage classes -> dtype name.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}


@dataclass(frozen=True, slots=True)
class StorageType:
    dtype: str | None  # None for UntypedStorage (bytes; the tensor names its dtype)


@dataclass(frozen=True, slots=True)
class DTypeMarker:
    dtype: str


@dataclass(frozen=True, slots=True)
class PickledStorage:
    key: str
    dtype: str | None  # None: untyped (byte) storage
    location: str
    numel: int  # elements of ``dtype``, or bytes when untyped
    view_offset: int = 0  # legacy storage views: element offset into the root storage
    root_key: str | None = None

    @property
    def nbytes(self) -> int:
        itemsize = DTYPES[self.dtype].itemsize if self.dtype else 1
        return self.numel * itemsize


@dataclass(frozen=True, slots=True)
class PickledTensor:
    storage: PickledStorage
    dtype: str
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    is_parameter: bool = False


@dataclass(frozen=True, slots=True)
class TensorType:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    is_parameter: bool


@dataclass(frozen=True, slots=True)
class FunctionRef:
    """An allowed function named as a value (e.g. the rebuild function passed to
    ``_rebuild_from_type_v2``), not called."""

    key: tuple[str, str]


def _bad(message: str) -> CheckpointError:
    return CheckpointError("corrupt_pickle", message)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_DIMS:
        raise _bad(f"tensor {what} is not a tuple of at most {MAX_DIMS} integers")
    out = tuple(value)
    for v in out:
        if type(v) is not int or v < 0:
            raise _bad(f"tensor {what} holds a non-integer or negative value")
    return out


def _make_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: str | None = None) -> PickledTensor:
    if not isinstance(storage, PickledStorage):
        raise _bad("tensor rebuilt from something that is not a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _bad("tensor storage offset is not a non-negative integer")
    shape = _int_tuple(size, "shape")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _bad("tensor shape and stride have different lengths")
    dtype = dtype or storage.dtype
    if dtype is None:
        raise _bad("untyped storage used without a dtype")
    return PickledTensor(storage, dtype, storage_offset, shape, strides)


# --- the stand-ins: what the allowed globals mean, as pure functions of interpreted values ----


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> PickledTensor:
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> PickledTensor:
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> PickledTensor:
    if not isinstance(dtype, DTypeMarker):
        raise _bad("tensor dtype is not a torch dtype")
    return _make_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None, *state: Any) -> Any:
    if not isinstance(data, PickledTensor):
        raise _bad("parameter rebuilt from something that is not a tensor")
    return replace(data, is_parameter=True)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not isinstance(new_type, TensorType) or not isinstance(args, tuple):
        raise _bad("unsupported tensor subclass in _rebuild_from_type_v2")
    builder = _FUNCTIONS.get(func.key) if isinstance(func, FunctionRef) else None
    if builder not in _TENSOR_BUILDERS:
        raise _bad("unsupported rebuild function in _rebuild_from_type_v2")
    result = builder(*args)
    if new_type.is_parameter and isinstance(result, PickledTensor):
        result = replace(result, is_parameter=True)
    return result


def _codecs_encode(value: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol-2 pickles spell ``bytes`` objects as _codecs.encode(str, "latin1").
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _bad("unsupported _codecs.encode call")
    return value.encode(encoding)


def _torch_size(value: Any = ()) -> tuple[int, ...]:
    return _int_tuple(value, "size")


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args if isinstance(a, str | int))


def _ordered_dict(*args: Any) -> dict[Any, Any]:
    if not args:
        return {}
    if len(args) != 1 or not isinstance(args[0], list | tuple | dict):
        raise _bad("unsupported OrderedDict arguments")
    pairs = args[0].items() if isinstance(args[0], dict) else args[0]
    out: dict[Any, Any] = {}
    for item in pairs:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise _bad("OrderedDict built from something that is not a list of pairs")
        out[_scalar_key(item[0])] = item[1]
    return out


_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _codecs_encode,
}
_TENSOR_BUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _build_values() -> dict[tuple[str, str], Any]:
    """Globals that stand for a value (a dtype, a storage class, a tensor class), immutable."""
    values: dict[tuple[str, str], Any] = {
        ("torch", "Tensor"): TensorType(False),
        ("torch.nn.parameter", "Parameter"): TensorType(True),
        ("torch.storage", "UntypedStorage"): StorageType(None),
        ("torch", "UntypedStorage"): StorageType(None),
    }
    for cls, dtype in _STORAGE_CLASSES.items():
        values[("torch", cls)] = StorageType(dtype)
    for dtype in DTYPES:
        values[("torch", dtype)] = DTypeMarker(dtype)
    for alias, dtype in _DTYPE_ALIASES.items():
        values[("torch", alias)] = DTypeMarker(dtype)
    return values


_VALUES = _build_values()


def refusal(module: str, name: str) -> CheckpointError | None:
    """Why a global makes the file unreadable, or None for one a state dict may name."""
    if (module, name) in _FUNCTIONS or (module, name) in _VALUES:
        return None
    qual = f"{module}.{name}"
    if module.startswith("torch.nn.modules") or module.startswith("torch.nn.") and name[:1].isupper():
        why = (
            f"the file pickles a whole module object ({qual}); ckptscope reads state dicts only, "
            "save model.state_dict() instead"
        )
    elif module.startswith("numpy"):
        why = f"the file pickles a numpy object ({qual}), which cannot be read without running code"
    elif module.startswith("torch"):
        why = f"the file uses {qual}, which is not part of a plain tensor state dict"
    else:
        why = f"the file asks to import {qual}; pickled code is never run"
    return CheckpointError("unsafe_pickle", f"refused to load: {why}")


# --- interpreting the graph -------------------------------------------------------------------

MAX_NESTING = 200
_SCALAR_KEYS = (str, int, float, bool, type(None))


def _scalar_key(key: Any) -> Any:
    """Dict keys of a checkpoint are names and indices; anything else is shown by its type
    (rendering it could cost as much as hashing it)."""
    return key if isinstance(key, _SCALAR_KEYS) else f"<{type(key).__name__} key>"


class _Interpreter:
    """Turns one file's graph into plain values (dicts, lists, tuples, scalars) with
    ``PickledTensor`` leaves. Each graph node is interpreted once (shared parts stay shared, so
    the work follows the graph, not the tree it unfolds to), every step charged to the budget."""

    def __init__(self, budget: WorkBudget) -> None:
        self.budget = budget
        self.storages: dict[str, PickledStorage] = {}
        self._done: dict[int, Any] = {}  # id of a graph node (alive: the graph holds it) -> value

    def value(self, node: Any, depth: int = 0) -> Any:
        kind = type(node)
        if kind in _PLAIN:
            return node
        key = id(node)
        known = self._done.get(key, _MISSING)
        if known is not _MISSING:
            return known
        if depth > MAX_NESTING:
            raise _bad("the checkpoint object nests too deeply")
        self.budget.spend()
        handler = _HANDLERS.get(kind)
        out = handler(self, node, depth + 1) if handler is not None else f"<{kind.__name__}>"  # bytearray: inert
        self._done[key] = out
        return out

    def _list(self, node: list[Any], depth: int) -> list[Any]:
        out: list[Any] = []
        self._done[id(node)] = out  # a list may contain itself
        self.budget.spend(len(node))
        value = self.value
        out.extend(v if type(v) in _PLAIN else value(v, depth) for v in node)
        return out

    def _dict(self, node: dict[Any, Any], depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        self._done[id(node)] = result
        self._set_items(result, node.items(), len(node), depth)
        return result

    def _set_items(self, target: dict[Any, Any], items: Iterable[tuple[Any, Any]], count: int, depth: int) -> None:
        self.budget.spend(count)
        value = self.value
        for k, v in items:
            key = k if type(k) is str else _scalar_key(value(k, depth))
            target[key] = v if type(v) in _PLAIN else value(v, depth)

    def _tuple(self, node: tuple[Any, ...], depth: int) -> tuple[Any, ...]:
        self.budget.spend(len(node))
        for v in node:
            if type(v) not in _PLAIN:
                break
        else:
            return node  # shapes, strides: as they are
        value = self.value
        return tuple(v if type(v) in _PLAIN else value(v, depth) for v in node)

    def _global(self, node: Global, _depth: int) -> Any:
        known = _VALUES.get(node.key)
        return known if known is not None else FunctionRef(node.key)

    def _built(self, node: Built, depth: int) -> Any:
        return self.value(node.target, depth)  # the state of a plain container is not applied

    def _set(self, node: SetRecord, depth: int) -> list[Any]:
        self.budget.spend(len(node.items))
        return [self.value(v, depth) for v in node.items]

    def _persistent(self, node: Persistent, depth: int) -> PickledStorage:
        return self._storage(self.value(node.pid, depth))

    def _call(self, node: Call, depth: int) -> Any:
        func = node.func
        fn = _FUNCTIONS.get(func.key) if isinstance(func, Global) else None
        if fn is None or node.kwargs:
            raise _bad("the pickle calls something that is not a function of a state dict")
        args = self.value(node.args, depth)
        if not isinstance(args, tuple | list):
            raise _bad("call arguments are not a tuple")
        try:
            result = fn(*args)
        except TypeError:
            raise _bad(f"{func.module}.{func.name} called with the wrong arguments") from None
        # BUILD states only carry what torch's weights-only loader also ignores for a state dict
        # (a Parameter's or tensor's python attributes, an OrderedDict's __dict__): recorded only
        if node.items:
            if not isinstance(result, dict):
                raise _bad("items set on something that is not a dict")
            self._set_items(result, node.items, len(node.items), depth)
        if node.appended:
            if not isinstance(result, list):
                raise _bad("items appended to something that is not a list")
            self.budget.spend(len(node.appended))
            result.extend(self.value(v, depth) for v in node.appended)
        return result

    def _storage(self, pid: Any) -> PickledStorage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise _bad("unknown persistent id in pickle (only storages are allowed)")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType):
            raise _bad("storage type in pickle is not a torch storage class")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(location, str):
            raise _bad("storage key or location is not a string")
        if type(numel) is not int or numel < 0:
            raise _bad("storage size is not a non-negative integer")
        known = self.storages.get(key)
        if known is None:
            known = PickledStorage(key, storage_type.dtype, location, numel)
            self.storages[key] = known
        elif known.numel != numel or known.dtype != storage_type.dtype:
            raise _bad(f"storage {key!r} declared twice with different sizes or dtypes")
        if view is None:
            return known
        if not isinstance(view, tuple) or len(view) != 3:
            raise _bad("malformed legacy storage view")
        view_key, view_offset, view_size = view
        if type(view_offset) is not int or type(view_size) is not int or view_offset < 0 or view_size < 0:
            raise _bad("malformed legacy storage view")
        if view_offset + view_size > numel:
            raise _bad("legacy storage view lies outside its storage")
        return PickledStorage(str(view_key), storage_type.dtype, location, view_size, view_offset, key)


_MISSING = object()
_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})
_HANDLERS: dict[type, Callable[[_Interpreter, Any, int], Any]] = {
    list: _Interpreter._list,
    dict: _Interpreter._dict,
    tuple: _Interpreter._tuple,
    Global: _Interpreter._global,
    Call: _Interpreter._call,
    Built: _Interpreter._built,
    SetRecord: _Interpreter._set,
    Persistent: _Interpreter._persistent,
}


def unpickle_restricted(
    data: bytes | BinaryIO, budget: WorkBudget | None = None
) -> tuple[Any, dict[str, PickledStorage]]:
    """Read one pickle (bytes, or a stream from its current position, left just past the STOP)
    into plain values with ``PickledTensor`` leaves, and the storages they use. A fresh machine
    and a fresh interpreter per call; nothing of one file can reach another."""
    if budget is None:
        if not isinstance(data, bytes):
            raise TypeError("a stream needs the budget of its file")
        budget = WorkBudget.for_bytes(len(data))
    graph = unpickle_graph(data, budget, refusal)
    interpreter = _Interpreter(budget)
    try:
        value = interpreter.value(graph)
    except RecursionError:
        raise _bad("the checkpoint object nests too deeply") from None
    return value, interpreter.storages
