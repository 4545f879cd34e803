"""A restricted unpickler for PyTorch's ``data.pkl`` that only records storages.

It never imports or calls anything from the pickle: every global a torch state dict
legitimately names is mapped to a local stand-in that builds a plain record, and every
other global is refused with a message naming it. No torch import is needed.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from ckptscope.errors import CheckpointError

from .model import DTYPES, MAX_DIMS

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
class _TensorTypeMarker:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    is_parameter: bool


class _Frozen:
    """Wraps a stand-in callable so the pickle's BUILD opcode cannot set attributes on it
    (a plain function's ``__defaults__`` would otherwise be writable across files)."""

    __slots__ = ("_fn",)
    _fn: Any

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")


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
    if not isinstance(new_type, _TensorTypeMarker) or not callable(func) or not isinstance(args, tuple):
        raise _bad("unsupported tensor subclass in _rebuild_from_type_v2")
    if not isinstance(func, _Frozen) or func._fn not in _TENSOR_BUILDERS:
        raise _bad("unsupported rebuild function in _rebuild_from_type_v2")
    result = func(*args)
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


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    return collections.OrderedDict(*args)


_TENSOR_BUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _build_allowed() -> dict[tuple[str, str], Any]:
    functions: dict[tuple[str, str], Any] = {
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
    allowed: dict[tuple[str, str], Any] = {key: _Frozen(fn) for key, fn in functions.items()}
    allowed |= {
        ("torch", "Tensor"): _TensorTypeMarker(False),
        ("torch.nn.parameter", "Parameter"): _TensorTypeMarker(True),
        ("torch.storage", "UntypedStorage"): StorageType(None),
        ("torch", "UntypedStorage"): StorageType(None),
    }
    for cls, dtype in _STORAGE_CLASSES.items():
        allowed[("torch", cls)] = StorageType(dtype)
    for dtype in DTYPES:
        allowed[("torch", dtype)] = DTypeMarker(dtype)
    for alias, dtype in _DTYPE_ALIASES.items():
        allowed[("torch", alias)] = DTypeMarker(dtype)
    return allowed


_ALLOWED = _build_allowed()


def _refusal(module: str, name: str) -> CheckpointError:
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


class StorageRecordingUnpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` into dicts/lists/scalars and ``PickledTensor`` records.

    Built on the pure-Python unpickler on purpose: the C one grows its memo *array* to the
    largest LONG_BINPUT index, so a 12-byte pickle makes it allocate and zero gigabytes; here the
    memo is a dict. Speed is about the same, because the stand-in callbacks dominate."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream)
        self.storages: dict[str, PickledStorage] = {}
        self.memo = _BoundedMemo()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _refusal(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> PickledStorage:
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


MAX_MEMO = 50_000_000


class _BoundedMemo(dict):  # type: ignore[type-arg]
    def __setitem__(self, key: Any, value: Any) -> None:
        if len(self) >= MAX_MEMO:
            raise CheckpointError("limit_exceeded", "pickle memo holds too many objects")
        super().__setitem__(key, value)


def unpickle_restricted(data: bytes | BinaryIO) -> tuple[Any, dict[str, PickledStorage]]:
    """Run the restricted unpickler over bytes, or from a stream's current position (which is
    left just past the pickle's STOP); any failure becomes a CheckpointError."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    unpickler = StorageRecordingUnpickler(stream)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError("corrupt_pickle", "pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError("limit_exceeded", "pickle needs too much memory to read") from None
    except Exception as exc:  # the C unpickler raises many types on malformed input
        raise CheckpointError("corrupt_pickle", f"malformed pickle: {type(exc).__name__}: {exc}"[:300]) from None
    return obj, unpickler.storages
