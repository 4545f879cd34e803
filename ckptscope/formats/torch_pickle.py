"""Reading PyTorch's pickles (``data.pkl``, the legacy format's pickles) without running them.

The pickle is first unpickled into an inert graph (``pickle_graph``: globals, calls and states
become records; nothing is imported or called). A file naming a global that could run code when
loaded unsafely (``pickle_globals.dangerous``) is refused, naming it and its arguments. Otherwise
the graph is interpreted: the globals of torch's tensor pickling become their meaning here (pure
functions building records, immutable markers), known value types become plain values, and every
other class an inert object (``pickle_objects``); tensors are validated once, from the finished
graph. No torch import is needed. Each file's reading also yields its pickle report
(``pickle_report``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from ckptscope.errors import CheckpointError

from .model import DTYPES, MAX_DIMS
from .pickle_globals import dangerous
from .pickle_graph import Built, Call, Census, Global, Persistent, SetRecord, WorkBudget, unpickle_graph
from .pickle_objects import (
    DATA_CONVERTERS,
    DICT_LIKE,
    NUMPY_RECONSTRUCT,
    RECONSTRUCTORS,
    InertObject,
    NotConvertible,
    NumpyDType,
    as_module,
    numpy_array,
    render,
)
from .pickle_report import Roles, build_report

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
    quantized: bool = False  # QInt8Storage & co: ``dtype`` is the integer representation


@dataclass(frozen=True, slots=True)
class DTypeMarker:
    dtype: str

    @property
    def label(self) -> str:
        return f"torch.{self.dtype}"


@dataclass(frozen=True, slots=True)
class PickledStorage:
    key: str
    dtype: str | None  # None: untyped (byte) storage
    location: str
    numel: int  # elements of ``dtype``, or bytes when untyped
    view_offset: int = 0  # legacy storage views: element offset into the root storage
    root_key: str | None = None
    qtype: str | None = None  # a quantized storage: its torch storage class (QInt8Storage, ...)

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
    quant: PickledQuant | None = None  # a quantized tensor (``dtype`` is its integer representation)


@dataclass(frozen=True, slots=True)
class PickledQuant:
    scheme: str
    qdtype: str
    scale: float = 1.0
    zero_point: int = 0
    axis: int = 0
    scales: PickledTensor | None = None
    zero_points: PickledTensor | None = None


@dataclass(frozen=True, slots=True)
class QSchemeMarker:
    name: str


_PER_TENSOR_SCHEMES = ("per_tensor_affine", "per_tensor_symmetric")
_PER_CHANNEL_SCHEMES = ("per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")
_QUANTIZED_STORAGES = {"QInt8Storage": "int8", "QUInt8Storage": "uint8", "QInt32Storage": "int32"}
_QDTYPES = {"int8": "qint8", "uint8": "quint8", "int32": "qint32"}


@dataclass(frozen=True, slots=True)
class TensorType:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    is_parameter: bool


@dataclass(frozen=True, slots=True)
class FunctionRef:
    """A global named as a value (e.g. the rebuild function passed to ``_rebuild_from_type_v2``,
    a class used as a defaultdict factory), never imported."""

    key: tuple[str, str]

    @property
    def label(self) -> str:
        return f"global {self.key[0]}.{self.key[1]}"


META = PickledStorage("", None, "meta", 0)  # the storage of a meta-device tensor: none


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


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> PickledTensor:
    if not isinstance(dtype, DTypeMarker):
        raise _bad("meta tensor dtype is not a torch dtype")
    shape = _int_tuple(size, "shape")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _bad("tensor shape and stride have different lengths")
    return PickledTensor(META, dtype.dtype, 0, shape, strides)


def _rebuild_qtensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    quantizer_params: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
) -> PickledTensor:
    tensor = _make_tensor(storage, storage_offset, size, stride)
    qdtype = _QDTYPES.get(tensor.dtype)
    if qdtype is None or not isinstance(storage, PickledStorage) or storage.qtype is None:
        raise _bad("quantized tensor on a storage that is not a quantized storage")
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise _bad("quantized tensor without quantizer parameters")
    scheme = quantizer_params[0]
    if not isinstance(scheme, QSchemeMarker):
        raise _bad("quantized tensor with an unknown quantization scheme")
    if scheme.name in _PER_TENSOR_SCHEMES and len(quantizer_params) == 3:
        _, scale, zero_point = quantizer_params
        if type(scale) is not float or type(zero_point) is not int:
            raise _bad("per-tensor quantization parameters are not a float scale and an integer zero point")
        return replace(tensor, quant=PickledQuant(scheme.name, qdtype, scale, zero_point))
    if scheme.name in _PER_CHANNEL_SCHEMES and len(quantizer_params) == 4:
        _, scales, zero_points, axis = quantizer_params
        if not isinstance(scales, PickledTensor) or not isinstance(zero_points, PickledTensor) or type(axis) is not int:
            raise _bad("per-channel quantization parameters are not two tensors and an axis")
        if (
            not 0 <= axis < len(tensor.shape)
            or scales.shape != (tensor.shape[axis],)
            or zero_points.shape != scales.shape
        ):
            raise _bad("per-channel quantization parameters do not match the tensor's channels")
        quant = PickledQuant(scheme.name, qdtype, axis=axis, scales=scales, zero_points=zero_points)
        return replace(tensor, quant=quant)
    raise _bad(f"unsupported quantization scheme {scheme.name}")


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
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta_tensor_no_storage,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _codecs_encode,
}
_TENSOR_BUILDERS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_meta_tensor_no_storage,
)
_DATA_FUNCTIONS = frozenset(
    {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("_codecs", "encode")}
)


def _build_values() -> dict[tuple[str, str], Any]:
    """Globals that stand for a value (a dtype, a storage class, a tensor class), immutable."""
    values: dict[tuple[str, str], Any] = {
        ("torch", "Tensor"): TensorType(False),
        ("torch.nn.parameter", "Parameter"): TensorType(True),
        ("torch.storage", "UntypedStorage"): StorageType(None),
        ("torch", "UntypedStorage"): StorageType(None),
    }
    for cls, dtype in _QUANTIZED_STORAGES.items():
        values[("torch", cls)] = StorageType(dtype, quantized=True)
    for scheme in (*_PER_TENSOR_SCHEMES, *_PER_CHANNEL_SCHEMES):
        values[("torch", scheme)] = QSchemeMarker(scheme)
    for cls, dtype in _STORAGE_CLASSES.items():
        values[("torch", cls)] = StorageType(dtype)
    for dtype in DTYPES:
        values[("torch", dtype)] = DTypeMarker(dtype)
    for alias, dtype in _DTYPE_ALIASES.items():
        values[("torch", alias)] = DTypeMarker(dtype)
    return values


_VALUES = _build_values()


def role_of(key: tuple[str, str]) -> str:
    """The report's role of a global as this interpreter reads it (before seeing how it is used)."""
    if key in _DATA_FUNCTIONS or key in DATA_CONVERTERS or key in DICT_LIKE or key in NUMPY_RECONSTRUCT:
        return "data"
    if key in _FUNCTIONS or key in _VALUES:
        return "tensor"
    if key in RECONSTRUCTORS:
        return "data"
    return "object" if key[1][:1].isupper() else "call"


_FUNCTION_ROLES = {key: role_of(key) for key in _FUNCTIONS}  # _call's, looked up once per call


def _module_class(func: Any, roles: Roles) -> tuple[str, str] | None:
    """The class of a module pickled in the legacy format, where ``torch.save(model)`` records each
    nn.Module class as a persistent id ("module", class, source file, source code)."""
    if type(func) is not Persistent or not isinstance(func.pid, tuple) or len(func.pid) < 2:
        return None
    if func.pid[0] not in ("module", b"module") or type(func.pid[1]) is not Global:
        return None
    roles.blocker = (
        "the pickle records module classes with their source code (torch.save(model) in the legacy format); "
        "torch.load(weights_only=True) refuses such persistent ids whatever the safe globals"
    )
    return func.pid[1].key


def _describe_call(qual: str, args: Any) -> str:
    if not isinstance(args, tuple | list):
        return qual
    text = ", ".join(repr(render(a)) if isinstance(render(a), str) else str(render(a)) for a in args[:8])
    return f"{qual}({text[:300]}{', …' if len(args) > 8 or len(text) > 300 else ''})"


def _first_call_args(graph: Any, key: tuple[str, str], budget: WorkBudget) -> Any:
    """The recorded arguments of the first call of the global ``key`` in the graph (None when it
    is only named), for the refusal message."""
    stack = [graph]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        budget.spend()
        kind = type(node)
        if kind is Call:
            if type(node.func) is Global and node.func.key == key:
                return node.args
            stack.extend([node.func, node.args, *(node.states or ()), *(v for kv in node.items or () for v in kv)])
            stack.extend(node.appended or ())
        elif kind is dict:
            stack.extend(node.keys())
            stack.extend(node.values())
        elif kind in (list, tuple):
            stack.extend(node)
        elif kind is Built:
            stack.extend((node.target, node.state))
        elif kind is SetRecord:
            stack.extend(node.items)
        elif kind is Persistent:
            stack.append(node.pid)
    return None


def refuse_dangerous(graph: Any, census: Census, budget: WorkBudget, roles: Roles) -> None:
    """Refuse the file when it names a global that could run code if loaded unsafely, naming the
    global and its arguments; the refusal carries the pickle report."""
    for key in census.counts:
        why = dangerous(*key)
        if why is None:
            continue
        roles.refused.add(key)
        qual = f"{key[0]}.{key[1]}"
        args = _first_call_args(graph, key, budget)
        if args is not None:
            shown = _Interpreter(budget, roles).value(args)
            what = f"calls {_describe_call(qual, shown)}"
        else:
            what = f"names {qual}"
        error = CheckpointError(
            "unsafe_pickle",
            f"refused to load: the pickle {what}, which {why} when loaded with torch.load(weights_only=False) "
            "or pickle.load; nothing in it was run",
        )
        for other in census.counts:
            if dangerous(*other) is not None:
                roles.refused.add(other)
        error.extra["pickle"] = build_report(census, roles, role_of)
        raise error


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

    def __init__(self, budget: WorkBudget, roles: Roles | None = None) -> None:
        self.budget = budget
        self.roles = roles if roles is not None else Roles()
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
        budget = self.budget
        budget.left -= 1  # budget.spend(), without a call per node
        if budget.left < 0:
            budget.spend(0)
        handler = _HANDLERS.get(kind)
        out = handler(self, node, depth + 1) if handler is not None else f"<{kind.__name__}>"  # bytearray: inert
        self._done[key] = out
        return out

    def _list(self, node: list[Any], depth: int) -> list[Any]:
        out: list[Any] = []
        self._done[id(node)] = out  # a list may contain itself
        self.budget.spend(len(node))
        value = self.value
        out.extend([v if type(v) in _PLAIN else value(v, depth) for v in node])
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
        return tuple([v if type(v) in _PLAIN else value(v, depth) for v in node])

    def _global(self, node: Global, _depth: int) -> Any:
        known = _VALUES.get(node.key)
        if known is not None:
            self.roles.used(node.key, "tensor")
            return known
        self.roles.used(node.key, "data" if role_of(node.key) == "data" else "object")  # named, not called
        return FunctionRef(node.key)

    def _built(self, node: Built, depth: int) -> Any:
        return self.value(node.target, depth)  # the state of a plain container is not applied (as torch)

    def _set(self, node: SetRecord, depth: int) -> list[Any]:
        self.budget.spend(len(node.items))
        return [self.value(v, depth) for v in node.items]

    def _persistent(self, node: Persistent, depth: int) -> PickledStorage:
        return self._storage(self.value(node.pid, depth))

    def _call(self, node: Call, depth: int) -> Any:
        func = node.func
        key = func.key if type(func) is Global else _module_class(func, self.roles)
        fn = _FUNCTIONS.get(key) if key is not None else None
        if fn is None or node.kwargs:
            return self._object(node, key, depth)
        assert key is not None  # fn was found by it
        self.roles.used(key, _FUNCTION_ROLES[key])
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

    def _object(self, node: Call, key: tuple[str, str] | None, depth: int) -> Any:
        """A call of anything but torch's tensor pickling: a known value type's value, or an inert
        object of the class it names (nothing is imported or called)."""
        args = self.value(node.args, depth)
        args = tuple(args) if isinstance(args, tuple | list) else (args,)
        state = self.value(node.states[-1], depth) if node.states else None
        if key is not None:
            self.roles.used(key, role_of(key))
        converter = DATA_CONVERTERS.get(key) if key is not None else None
        if converter is not None and not node.items and not node.appended:
            try:
                value = converter(args, state)
            except (NotConvertible, TypeError, ValueError, IndexError, OverflowError):
                pass
            else:
                if isinstance(value, NumpyDType) and node.states and value.instance_class:
                    self.roles.also_needed[value.instance_class] = None
                return value
        if key in NUMPY_RECONSTRUCT:
            array = numpy_array(state)
            if array is not None:
                return array
        cls = f"{key[0]}.{key[1]}" if key is not None else "<the result of a call>"
        if key in RECONSTRUCTORS and args and isinstance(args[0], FunctionRef):
            inner = args[0].key
            self.roles.used(inner, "object")
            cls, args = f"{inner[0]}.{inner[1]}", args[1:] if key == ("copyreg", "__newobj__") else ()
        items: dict[Any, Any] | None = None
        if node.items:
            items = {}
            self._set_items(items, node.items, len(node.items), depth)
        appended = None
        if node.appended:
            self.budget.spend(len(node.appended))
            appended = [self.value(v, depth) for v in node.appended]
        if key in DICT_LIKE:
            return items or {}
        obj = InertObject(cls, args, state, items, appended)
        if isinstance(node.kwargs, dict):
            obj.args = (*args, self.value(node.kwargs, depth))
        module = as_module(obj)
        return module if module is not None else obj

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
            known = PickledStorage(
                key, storage_type.dtype, location, numel, qtype="quantized" if storage_type.quantized else None
            )
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
        return PickledStorage(
            str(view_key),
            storage_type.dtype,
            location,
            view_size,
            view_offset,
            key,
            "quantized" if storage_type.quantized else None,
        )


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


class PickleReader:
    """Reads the pickles of one file (one for a zip's data.pkl, five for a legacy file) with one
    budget, gathering one census of what they name and one pickle report."""

    def __init__(self, budget: WorkBudget) -> None:
        self.budget = budget
        self.census = Census()
        self.roles = Roles()

    def load(self, data: bytes | BinaryIO) -> tuple[Any, dict[str, PickledStorage]]:
        """One pickle (bytes, or a stream from its current position, left just past the STOP)
        as plain values with ``PickledTensor`` leaves, and the storages they use. A fresh machine
        and a fresh interpreter per pickle; nothing of one file can reach another."""
        graph = unpickle_graph(data, self.budget, _record_only, self.census)
        refuse_dangerous(graph, self.census, self.budget, self.roles)
        interpreter = _Interpreter(self.budget, self.roles)
        try:
            value = interpreter.value(graph)
        except RecursionError:
            raise _bad("the checkpoint object nests too deeply") from None
        return value, interpreter.storages

    def report(self) -> dict[str, Any]:
        return build_report(self.census, self.roles, role_of)


def _record_only(_module: str, _name: str) -> CheckpointError | None:
    return None  # every global is recorded; refuse_dangerous decides once the graph is read
