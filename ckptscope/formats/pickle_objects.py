"""Plain Python objects in a pickle, read as inert data: what they become after interpretation.

A checkpoint pickles more than tensors: ``argparse.Namespace`` arguments (timm, fairseq),
dataclasses (``TrainingArguments``), numpy arrays and RNG state, datetimes, paths, config objects,
and whole ``nn.Module`` objects. None of their classes is imported. Known value types become
plain values (``DATA_CONVERTERS``: pure functions of the recorded arguments); every other class
becomes an ``InertObject`` (its class name and recorded state); an object whose state holds
``_parameters``/``_buffers``/``_modules`` is a pickled module (``PickledModule``), whose tensors
are the checkpoint's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

MAX_RENDERED_FIELDS = 64
MAX_TEXT = 1000


@dataclass(eq=False, slots=True)
class InertObject:
    """An instance of a class that was never imported: its name and what the pickle recorded."""

    cls: str  # module.qualname
    args: tuple[Any, ...] = ()
    state: Any = None  # the BUILD state (usually the instance __dict__)
    items: dict[Any, Any] | None = None  # dict subclasses: the items set on it
    appended: list[Any] | None = None  # list subclasses: the items appended

    def _parts(self) -> list[dict[Any, Any]]:
        state = self.state
        parts: list[dict[Any, Any]] = []
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            parts += [p for p in state if isinstance(p, dict)]  # (instance dict, slot state)
        elif isinstance(state, dict):
            parts.append(state)
        if self.items:
            parts.append(self.items)
        return parts

    def iter_fields(self) -> Iterator[tuple[str, Any]]:
        """The recorded attributes, without copying them: the state dict (and the slot state of a
        (dict, slots) pair), then the dict-subclass items."""
        for part in self._parts():
            for k, v in part.items():
                yield str(k), v

    def field_count(self) -> int:
        return sum(len(p) for p in self._parts())

    def fields(self) -> dict[str, Any]:
        return dict(self.iter_fields())


@dataclass(eq=False, slots=True)
class PickledModule:
    """A pickled ``torch.nn.Module``: its class and the state_dict-bearing parts of its state."""

    cls: str
    parameters: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)
    non_persistent: frozenset[str] = frozenset()


MODULE_KEYS = ("_parameters", "_buffers", "_modules")


def as_module(obj: InertObject) -> PickledModule | None:
    """The module view of an object whose state is an ``nn.Module``'s, else None."""
    if not any(isinstance(p.get(k), dict) for p in obj._parts() for k in MODULE_KEYS):
        return None
    state = obj.fields()

    def part(key: str) -> dict[str, Any]:
        value = state.get(key)
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}

    non_persistent = state.get("_non_persistent_buffers_set")
    names = frozenset(str(n) for n in non_persistent) if isinstance(non_persistent, list | tuple | set) else frozenset()
    return PickledModule(obj.cls, part("_parameters"), part("_buffers"), part("_modules"), names)


# --- known value types --------------------------------------------------------------------------


class NotConvertible(Exception):
    """The recorded arguments are not what the type's pickling writes: keep it an inert object."""


def _bytes_arg(args: tuple[Any, ...], length: int) -> bytes:
    if not args or not isinstance(args[0], bytes) or len(args[0]) != length:
        raise NotConvertible
    return args[0]


def _datetime(args: tuple[Any, ...], _state: Any) -> str:
    b = _bytes_arg(args, 10)
    text = (
        f"{b[0] * 256 + b[1]:04d}-{b[2]:02d}-{b[3]:02d}T{b[4]:02d}:{b[5]:02d}:{b[6]:02d}"
        f".{(b[7] << 16) | (b[8] << 8) | b[9]:06d}"
    )
    return text + (" (with a time zone)" if len(args) > 1 and args[1] is not None else "")


def _date(args: tuple[Any, ...], _state: Any) -> str:
    b = _bytes_arg(args, 4)
    return f"{b[0] * 256 + b[1]:04d}-{b[2]:02d}-{b[3]:02d}"


def _time(args: tuple[Any, ...], _state: Any) -> str:
    b = _bytes_arg(args, 6)
    return f"{b[0]:02d}:{b[1]:02d}:{b[2]:02d}.{(b[3] << 16) | (b[4] << 8) | b[5]:06d}"


def _timedelta(args: tuple[Any, ...], _state: Any) -> str:
    if len(args) != 3 or not all(type(a) is int for a in args):
        raise NotConvertible
    days, seconds, micro = args
    return f"{days} days, {seconds + micro / 1e6:g} s"


def _path(args: tuple[Any, ...], _state: Any) -> str:
    if not all(isinstance(a, str) for a in args):
        raise NotConvertible
    text = "/".join(a.rstrip("/") if i == 0 and a != "/" else a for i, a in enumerate(args))
    return text.replace("//", "/")[:MAX_TEXT]


def _number(args: tuple[Any, ...], _state: Any) -> Any:
    if len(args) != 1 or not isinstance(args[0], str | int | float):
        raise NotConvertible
    return str(args[0])[:MAX_TEXT]


def _complex(args: tuple[Any, ...], _state: Any) -> str:
    if not all(isinstance(a, int | float) for a in args) or len(args) > 2:
        raise NotConvertible
    return str(complex(*args))


def _container(args: tuple[Any, ...], _state: Any) -> list[Any]:
    if len(args) > 1 or (args and not isinstance(args[0], list | tuple)):
        raise NotConvertible
    return list(args[0]) if args else []


def _slice_or_range(args: tuple[Any, ...], _state: Any) -> str:
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise NotConvertible
    return f"range/slice({', '.join(str(a) for a in args)})"


def _uuid(_args: tuple[Any, ...], state: Any) -> str:
    value = state.get("int") if isinstance(state, dict) else None
    if type(value) is not int or not 0 <= value < 2**128:
        raise NotConvertible
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# numpy: ndarray state is (version, shape, dtype, is_fortran, raw bytes or list); dtypes are
# numpy.dtype(code, align, copy) with a BUILD state whose [1] is the byte order.
_NUMPY_FORMATS = {
    "f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
    "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class NumpyDType:
    code: str  # "f8", "u4", ...

    def __str__(self) -> str:
        return self.code

    @property
    def instance_class(self) -> str | None:
        """The class of such a dtype object in numpy >= 1.25 (what torch's weights-only BUILD checks)."""
        name = _NUMPY_DTYPE_CLASSES.get(self.code)
        return f"numpy.dtypes.{name}" if name else None


_NUMPY_DTYPE_CLASSES = {
    "f8": "Float64DType", "f4": "Float32DType", "f2": "Float16DType", "i8": "Int64DType", "i4": "Int32DType",
    "i2": "Int16DType", "i1": "Int8DType", "u8": "UInt64DType", "u4": "UInt32DType", "u2": "UInt16DType",
    "u1": "UInt8DType", "b1": "BoolDType", "c16": "Complex128DType", "c8": "Complex64DType",
}  # fmt: skip


def _numpy_dtype(args: tuple[Any, ...], _state: Any) -> NumpyDType:
    if not args or not isinstance(args[0], str) or len(args[0]) > 16:
        raise NotConvertible
    return NumpyDType(args[0])


def _numpy_scalar(args: tuple[Any, ...], _state: Any) -> Any:
    if len(args) != 2 or not isinstance(args[0], NumpyDType) or not isinstance(args[1], bytes):
        raise NotConvertible
    fmt = _NUMPY_FORMATS.get(args[0].code)
    if fmt is None or struct.calcsize(fmt) != len(args[1]):
        return f"<numpy {args[0].code} scalar>"
    value = struct.unpack("<" + fmt, args[1])[0]
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


@dataclass(frozen=True, slots=True)
class NumpyArray:
    dtype: str
    shape: tuple[int, ...]
    values: list[Any] | None  # small arrays only

    def render(self) -> str:
        dims = "×".join(str(d) for d in self.shape) or "scalar"
        head = f"<numpy array {self.dtype} [{dims}]"
        return head + (f" {self.values}>" if self.values is not None else ">")


def numpy_array(state: Any) -> NumpyArray | None:
    """An ndarray from its recorded BUILD state, or None when the state is not one."""
    if not isinstance(state, tuple) or len(state) != 5:
        return None
    _version, shape, dtype, _fortran, raw = state
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    code = str(dtype) if isinstance(dtype, NumpyDType) else "object"
    values: list[Any] | None = None
    count = math.prod(shape)
    fmt = _NUMPY_FORMATS.get(code)
    if isinstance(raw, bytes) and fmt is not None and count <= 16 and len(raw) == count * struct.calcsize(fmt):
        values = [
            v if not isinstance(v, float) or math.isfinite(v) else str(v) for v in struct.unpack(f"<{count}{fmt}", raw)
        ]
    return NumpyArray(code, shape, values)


Converter = Callable[[tuple[Any, ...], Any], Any]

DATA_CONVERTERS: dict[tuple[str, str], Converter] = {
    ("datetime", "datetime"): _datetime,
    ("datetime", "date"): _date,
    ("datetime", "time"): _time,
    ("datetime", "timedelta"): _timedelta,
    ("decimal", "Decimal"): _number,
    ("fractions", "Fraction"): _number,
    ("builtins", "complex"): _complex,
    ("builtins", "set"): _container,
    ("builtins", "frozenset"): _container,
    ("builtins", "list"): _container,
    ("builtins", "tuple"): _container,
    ("builtins", "bytearray"): lambda args, _s: (
        f"<bytearray of {len(args[0]) if args and isinstance(args[0], bytes | str) else 0} bytes>"
    ),
    ("builtins", "slice"): _slice_or_range,
    ("builtins", "range"): _slice_or_range,
    ("collections", "deque"): _container,
    ("uuid", "UUID"): _uuid,
    **{
        (module, cls): _path
        for module in ("pathlib", "pathlib._local")
        for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    },
    **{(m, "dtype"): _numpy_dtype for m in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
}
NUMPY_RECONSTRUCT = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")})
# dict subclasses whose items are their data (Lightning's AttributeDict is an unknown class and
# stays an object with items; these are the standard ones)
DICT_LIKE = frozenset({("collections", "defaultdict"), ("collections", "Counter")})
# object constructors of pickle protocols 0-2: the class is their first argument
RECONSTRUCTORS = frozenset({("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copy_reg", "_reconstructor")})


def render(value: Any, depth: int = 0) -> Any:
    """A JSON-safe rendering of a non-tensor value (attacker text stays text, sizes bounded)."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            # str() of a huge int is quadratic (and refused past 4300 digits)
            return str(value) if value.bit_length() <= 256 else f"<int of {value.bit_length()} bits>"
        return value[:MAX_TEXT] if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, NumpyArray):
        return value.render()
    if isinstance(value, NumpyDType):
        return f"<numpy dtype {value.code}>"
    if depth >= 3:
        return f"<{_kind_name(value)}>"
    if isinstance(value, InertObject):
        count = value.field_count()
        out: dict[str, Any] = {"__class__": value.cls}
        if not count and value.args:
            out["args"] = render(list(value.args[:MAX_RENDERED_FIELDS]), depth + 1)
        for k, v in islice(value.iter_fields(), MAX_RENDERED_FIELDS):
            out[k[:200]] = render(v, depth + 1)
        if count > MAX_RENDERED_FIELDS:
            out["…"] = f"{count - MAX_RENDERED_FIELDS} more fields"
        if value.appended:
            out["items"] = render(value.appended[:MAX_RENDERED_FIELDS], depth + 1)
        return out
    if isinstance(value, PickledModule):
        return f"<module {value.cls}>"
    if isinstance(value, dict) and len(value) <= MAX_RENDERED_FIELDS:
        return {str(k)[:200]: render(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple) and len(value) <= MAX_RENDERED_FIELDS:
        return [render(v, depth + 1) for v in value]
    if isinstance(value, dict | list | tuple):
        return f"<{type(value).__name__} of {len(value)} items>"
    return f"<{_kind_name(value)}>"


def _kind_name(value: Any) -> str:
    if isinstance(value, InertObject | PickledModule):
        return value.cls
    label = getattr(value, "label", None)
    if isinstance(label, str):
        return label
    return type(value).__name__
