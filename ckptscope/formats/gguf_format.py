"""GGUF (llama.cpp, ollama), versions 2 and 3: parsed here, never with ``gguf.GGUFReader`` (which
maps the file and trusts its counts).

Layout (little-endian): ``GGUF``, u32 version, u64 tensor count, u64 key-value count, the typed
key-values (u64-length strings, u32 type ids, arrays of any type, arrays included), the tensor
infos (name, u32 n_dims, u64 dims with ``ne[0]`` the fastest, u32 ggml type, u64 offset into the
data section), padding to ``general.alignment`` (default 32), then the data. Quantised types store
blocks: ``block_size`` values in ``type_size`` bytes (Q8_0: 32 in 34); a row along ``ne[0]`` is a
whole number of blocks, as llama.cpp requires.

Every count and length is bounded by the bytes left in the file before anything is allocated or
looped over, and the whole walk of the key-values by one work budget. The header is read with
plain reads (a window at a time, never a mapping: the sandbox caps the address space). No numpy,
no gguf package and no torch here: listing stays cheap; ``gguf_decoding.py`` decodes.

Tensors keep the file's names (``blk.0.attn_q.weight``); their shape is the torch order, the
reverse of the GGUF dims (as gguf-py's ``tensor.data.shape`` and the convert scripts have it).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ckptscope.errors import CheckpointError

from .model import MAX_DIMS, Checkpoint, RootInfo, StorageRef, TensorInfo, contiguous_stride, tensor_kind
from .ranged_path import as_path

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_KEY_BYTES = 65_536
MAX_NAME_BYTES = 8_192  # llama.cpp allows 63
MAX_ARRAY_DEPTH = 8  # arrays of arrays (llama.cpp itself reads none)
MAX_ITEMS = 16_000_000  # strings and arrays visited one by one in all the key-values together
MAX_KEPT_TEXT = 16 << 20  # characters of metadata text kept in the listing
STRING_KEEP = 65_536  # a longer metadata string is cut (with a note of its length)
PREVIEW_STRING = 200  # characters of each string shown in an array's preview
ARRAY_KEEP = 32  # a longer array is summarised: "<array of N type>" and its first items
ARRAY_PREVIEW = 8
READ_AHEAD = 1 << 20

MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte value
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims 0, type, offset


@dataclass(frozen=True, slots=True)
class GGMLType:
    """One ggml tensor type: ``block_size`` values stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int
    torch_dtype: str | None = None  # the torch dtype of a plain (unblocked) type

    @property
    def encoded(self) -> bool:
        return self.torch_dtype is None


# ggml's type table as gguf 0.19 has it (gguf.constants.GGML_QUANT_SIZES; tests/formats/test_gguf.py
# checks this copy against it). Kept here so that listing a GGUF file imports neither gguf nor numpy.
_TYPE_LIST = [
    GGMLType(0, "F32", 1, 4, "float32"),
    GGMLType(1, "F16", 1, 2, "float16"),
    GGMLType(2, "Q4_0", 32, 18),
    GGMLType(3, "Q4_1", 32, 20),
    GGMLType(6, "Q5_0", 32, 22),
    GGMLType(7, "Q5_1", 32, 24),
    GGMLType(8, "Q8_0", 32, 34),
    GGMLType(9, "Q8_1", 32, 40),
    GGMLType(10, "Q2_K", 256, 84),
    GGMLType(11, "Q3_K", 256, 110),
    GGMLType(12, "Q4_K", 256, 144),
    GGMLType(13, "Q5_K", 256, 176),
    GGMLType(14, "Q6_K", 256, 210),
    GGMLType(15, "Q8_K", 256, 292),
    GGMLType(16, "IQ2_XXS", 256, 66),
    GGMLType(17, "IQ2_XS", 256, 74),
    GGMLType(18, "IQ3_XXS", 256, 98),
    GGMLType(19, "IQ1_S", 256, 50),
    GGMLType(20, "IQ4_NL", 32, 18),
    GGMLType(21, "IQ3_S", 256, 110),
    GGMLType(22, "IQ2_S", 256, 82),
    GGMLType(23, "IQ4_XS", 256, 136),
    GGMLType(24, "I8", 1, 1, "int8"),
    GGMLType(25, "I16", 1, 2, "int16"),
    GGMLType(26, "I32", 1, 4, "int32"),
    GGMLType(27, "I64", 1, 8, "int64"),
    GGMLType(28, "F64", 1, 8, "float64"),
    GGMLType(29, "IQ1_M", 256, 56),
    GGMLType(30, "BF16", 1, 2, "bfloat16"),
    GGMLType(34, "TQ1_0", 256, 54),
    GGMLType(35, "TQ2_0", 256, 66),
    GGMLType(39, "MXFP4", 32, 17),
    GGMLType(40, "NVFP4", 64, 36),
    GGMLType(41, "Q1_0", 128, 18),
]
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in _TYPE_LIST}
GGML_TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in _TYPE_LIST}

# GGUF value types: id -> (name, struct of a scalar or None, bytes an item takes at least)
_STRING, _ARRAY, _BOOL, _F32, _F64 = 8, 9, 7, 6, 12
_VALUE_TYPES: dict[int, tuple[str, struct.Struct | None, int]] = {
    0: ("u8", struct.Struct("<B"), 1),
    1: ("i8", struct.Struct("<b"), 1),
    2: ("u16", struct.Struct("<H"), 2),
    3: ("i16", struct.Struct("<h"), 2),
    4: ("u32", struct.Struct("<I"), 4),
    5: ("i32", struct.Struct("<i"), 4),
    6: ("f32", struct.Struct("<f"), 4),
    7: ("bool", struct.Struct("<B"), 1),
    8: ("str", None, 8),
    9: ("array", None, 12),
    10: ("u64", struct.Struct("<Q"), 8),
    11: ("i64", struct.Struct("<q"), 8),
    12: ("f64", struct.Struct("<d"), 8),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")


def _bad(message: str) -> CheckpointError:
    return CheckpointError("corrupt_gguf", message)


def _limit(message: str) -> CheckpointError:
    return CheckpointError("limit_exceeded", message)


class _Cursor:
    """Sequential reads of the header through a window of the file; every read is first checked
    against the bytes left, so a length from the file can never make us read or allocate more."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size
        self.pos = 0
        self.buf = b""
        self.buf_start = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _at(self, n: int) -> int:
        """Index in ``buf`` of the next ``n`` bytes (refilling the window as needed)."""
        if n > self.size - self.pos:
            raise CheckpointError("truncated", f"the GGUF header ends early (at byte {self.pos} of {self.size})")
        rel = self.pos - self.buf_start
        if rel < 0 or rel + n > len(self.buf):
            self.fh.seek(self.pos)
            self.buf = self.fh.read(max(n, READ_AHEAD))
            self.buf_start = self.pos
            rel = 0
            if len(self.buf) < n:
                raise CheckpointError("truncated", "the GGUF file ended while its header was being read")
        return rel

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        rel = self._at(st.size)
        self.pos += st.size
        return st.unpack_from(self.buf, rel)

    def u32(self) -> int:
        value: int = self.unpack(_U32)[0]
        return value

    def u64(self) -> int:
        value: int = self.unpack(_U64)[0]
        return value

    def take(self, n: int) -> bytes:
        rel = self._at(n)
        self.pos += n
        return self.buf[rel : rel + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise CheckpointError("truncated", f"the GGUF header ends early (at byte {self.pos} of {self.size})")
        self.pos += n

    def length(self, what: str) -> int:
        """A u64 string length, checked against the bytes left."""
        n = self.u64()
        if n > self.left:
            raise _bad(f"{what} claims {n} bytes but only {self.left} are left in the file")
        return n


def _float_value(raw: float, single: bool) -> float | str:
    """A JSON-safe float: non-finite values as text; float32 values in their shortest form
    (1e-05 rather than 9.999999747378752e-06)."""
    if not math.isfinite(raw):
        return "NaN" if raw != raw else ("Infinity" if raw > 0 else "-Infinity")
    if single:
        packed = struct.pack("<f", raw)
        for digits in range(1, 10):
            short = float(f"{raw:.{digits}g}")
            if struct.pack("<f", short) == packed:
                return short
    return raw


class _KeyValues:
    """The key-value section, read into plain JSON values under one budget."""

    def __init__(self, cur: _Cursor) -> None:
        self.cur = cur
        self.items = 0  # strings and arrays visited
        self.kept = 0  # characters of text kept

    def _count(self, n: int) -> None:
        self.items += n
        if self.items > MAX_ITEMS:
            raise _limit(f"the GGUF metadata holds more than {MAX_ITEMS} strings and arrays")

    def _text(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        self.kept += len(text)
        if self.kept > MAX_KEPT_TEXT:
            raise _limit(f"the GGUF metadata holds more than {MAX_KEPT_TEXT >> 20} MiB of text")
        return text

    def string(self, keep: int = STRING_KEEP) -> str:
        n = self.cur.length("a metadata string")
        if n <= keep:
            return self._text(self.cur.take(n))
        text = self._text(self.cur.take(keep)).rstrip("\ufffd")
        self.cur.skip(n - keep)
        return f"{text}… [{n} bytes in all]"

    def value_type(self, where: str) -> int:
        type_id = self.cur.u32()
        if type_id not in _VALUE_TYPES:
            raise _bad(f"{where} has unknown GGUF value type {type_id}")
        return type_id

    def value(self, type_id: int, where: str, depth: int = 0, keep: int = STRING_KEEP) -> Any:
        st = _VALUE_TYPES[type_id][1]
        if st is not None:
            raw = self.cur.unpack(st)[0]
            if type_id == _BOOL:
                return bool(raw)
            if type_id in (_F32, _F64):
                return _float_value(raw, type_id == _F32)
            return raw
        if type_id == _STRING:
            self._count(1)
            return self.string(keep)
        return self.array(where, depth)

    def _array_head(self, where: str, depth: int) -> tuple[int, int]:
        """(item type, count) of an array, the count checked against the bytes left and, for
        strings and arrays, charged to the budget before any of them is read."""
        if depth >= MAX_ARRAY_DEPTH:
            raise _bad(f"{where}: arrays nest more than {MAX_ARRAY_DEPTH} deep")
        item_type = self.value_type(f"an array in {where}")
        count = self.cur.u64()
        item_name, st, min_size = _VALUE_TYPES[item_type]
        if count > self.cur.left // min_size:
            raise _bad(f"{where}: an array of {count} {item_name} items cannot fit in the {self.cur.left} bytes left")
        if st is None:
            self._count(count)
        return item_type, count

    def array(self, where: str, depth: int) -> Any:
        item_type, count = self._array_head(where, depth)
        whole = count <= ARRAY_KEEP
        shown = count if whole else ARRAY_PREVIEW
        keep = STRING_KEEP if whole else PREVIEW_STRING
        items = [self.value(item_type, where, depth + 1, keep) for _ in range(shown)]
        self._skip_items(item_type, count - shown, where, depth)
        if whole:
            return items
        return {"summary": f"<array of {count} {_VALUE_TYPES[item_type][0]}>", "first": items}

    def _skip_items(self, item_type: int, count: int, where: str, depth: int) -> None:
        _, st, min_size = _VALUE_TYPES[item_type]
        if st is not None:
            self.cur.skip(count * min_size)  # fixed-size items: skipped without a loop
        elif item_type == _STRING:
            self._skip_strings(count)
        else:
            for _ in range(count):
                inner_type, inner_count = self._array_head(where, depth + 1)
                self._skip_items(inner_type, inner_count, where, depth + 1)

    def _skip_strings(self, count: int) -> None:
        """Skip ``count`` strings (a vocabulary: the hot loop of a listing) reading only their lengths."""
        cur, unpack = self.cur, _U64.unpack_from
        buf, base, pos, size = cur.buf, cur.buf_start, cur.pos, cur.size
        for _ in range(count):
            rel = pos - base
            if rel < 0 or rel + 8 > len(buf):
                cur.pos = pos
                rel = cur._at(8)
                buf, base = cur.buf, cur.buf_start
            n = unpack(buf, rel)[0]
            pos += 8 + n
            if pos > size:
                cur.pos = pos - n
                raise _bad(f"a metadata string claims {n} bytes but only {size - cur.pos} are left in the file")
        cur.pos = pos


def _version(raw_version: int) -> int:
    if raw_version in (2, 3):
        return raw_version
    swapped = int.from_bytes(raw_version.to_bytes(4, "little"), "big")
    if swapped in (2, 3):
        raise CheckpointError("unsupported_format", f"this is a big-endian GGUF v{swapped} file; it is not supported")
    if raw_version == 1:
        raise CheckpointError(
            "unsupported_format", "this is a GGUF version 1 file (llama.cpp before August 2023); it is not supported"
        )
    raise CheckpointError(
        "unsupported_format", f"this GGUF file declares version {raw_version}; ckptscope reads GGUF versions 2 and 3"
    )


def _alignment(value: Any) -> int:
    if value.__class__ is not int:
        raise _bad(f"general.alignment is {type(value).__name__} {str(value)[:40]!r}, not an integer")
    if not 1 <= value <= MAX_ALIGNMENT or value & (value - 1):
        raise _bad(f"general.alignment {value} is not a power of two between 1 and {MAX_ALIGNMENT}")
    alignment: int = value
    return alignment


def _tensor_name(cur: _Cursor, index: int) -> str:
    n = cur.length(f"the name of tensor {index}")
    if n > MAX_NAME_BYTES:
        raise _limit(f"tensor {index} has a name of {n} bytes (limit {MAX_NAME_BYTES})")
    try:
        return cur.take(n).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"the name of tensor {index} is not valid UTF-8") from None


class _RawTensor:
    __slots__ = ("dims", "ggml", "name", "offset")

    def __init__(self, name: str, dims: tuple[int, ...], ggml: GGMLType, offset: int) -> None:
        self.name, self.dims, self.ggml, self.offset = name, dims, ggml, offset


def _tensor_info(cur: _Cursor, index: int) -> _RawTensor:
    name = _tensor_name(cur, index)
    n_dims = cur.u32()
    if n_dims > MAX_DIMS:
        raise _bad(f"tensor {name[:200]!r} declares {n_dims} dimensions (at most {MAX_DIMS})")
    dims = cur.unpack(struct.Struct(f"<{n_dims}Q")) if n_dims else ()
    for d in dims:
        if d >= 1 << 63:
            raise _bad(f"tensor {name[:200]!r} has a dimension of {d}, beyond int64")
    type_id = cur.u32()
    ggml = GGML_TYPES.get(type_id)
    if ggml is None:
        raise CheckpointError(
            "unsupported_dtype",
            f"tensor {name[:200]!r} has ggml type id {type_id}, which ckptscope does not know "
            "(removed, or newer than it)",
        )
    return _RawTensor(name, tuple(dims), ggml, cur.u64())


def read_gguf(path: str | Path) -> Checkpoint:
    path = as_path(path)
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        cur = _Cursor(fh, size)
        if size < _HEADER.size:
            raise CheckpointError("truncated", f"the file is too short ({size} bytes) to be GGUF")
        magic, raw_version, tensor_count, kv_count = cur.unpack(_HEADER)
        if magic != MAGIC:
            raise _bad("the file does not start with the GGUF magic")
        version = _version(raw_version)
        if tensor_count > MAX_TENSORS:
            raise _limit(f"the GGUF file declares {tensor_count} tensors (limit {MAX_TENSORS})")
        if kv_count > MAX_KV:
            raise _limit(f"the GGUF file declares {kv_count} key-values (limit {MAX_KV})")
        if tensor_count * MIN_TENSOR_BYTES + kv_count * MIN_KV_BYTES > cur.left:
            raise _bad(
                f"the GGUF header declares {tensor_count} tensors and {kv_count} key-values, "
                f"which cannot fit in the file's {size} bytes"
            )
        kvs = _KeyValues(cur)
        metadata: dict[str, Any] = {}
        for i in range(kv_count):
            n = cur.length(f"key {i}")
            if n > MAX_KEY_BYTES:
                raise _limit(f"metadata key {i} is {n} bytes long (limit {MAX_KEY_BYTES})")
            key = cur.take(n).decode("utf-8", "replace")
            if key in metadata:
                raise _bad(f"the GGUF metadata has duplicate key {key[:200]!r}")
            kvs.kept += len(key)
            metadata[key] = kvs.value(kvs.value_type(f"key {key[:200]!r}"), f"key {key[:200]!r}")
        alignment = _alignment(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if tensor_count * MIN_TENSOR_BYTES > cur.left:
            raise _bad(f"the GGUF header declares {tensor_count} tensors, which cannot fit in the bytes left")
        raw = [_tensor_info(cur, i) for i in range(tensor_count)]
        data_start = cur.pos + (-cur.pos % alignment)
    tensors = _tensors(raw, str(path), data_start, alignment, size)
    info = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
    return Checkpoint(
        format="gguf",
        tensors=tensors,
        roots=[RootInfo("", len(tensors))],
        metadata=info | metadata,
        files=[str(path)],
    )


def _tensors(raw: list[_RawTensor], spath: str, data_start: int, alignment: int, size: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    names: set[str] = set()
    for t in raw:
        name, ggml = t.name, t.ggml
        if name in names:
            raise _bad(f"the GGUF file has two tensors named {name[:200]!r}")
        names.add(name)
        row = t.dims[0] if t.dims else 1
        if row % ggml.block_size:
            raise _bad(
                f"tensor {name[:200]!r}: a row of {row} values is not a whole number of {ggml.name} blocks "
                f"({ggml.block_size} values each)"
            )
        shape = tuple(reversed(t.dims))
        numel = math.prod(shape)
        nbytes = numel // ggml.block_size * ggml.type_size
        if t.offset % alignment:
            raise _bad(f"tensor {name[:200]!r} starts at data offset {t.offset}, not aligned to {alignment} bytes")
        start = data_start + t.offset
        if start + nbytes > size:
            raise _bad(
                f"tensor {name[:200]!r} ({nbytes} bytes of {ggml.name} at data offset {t.offset}) "
                f"lies outside the file ({size} bytes)"
            )
        if nbytes:
            spans.append((start, start + nbytes, name))
        storage = StorageRef(spath, start, nbytes, name)
        dtype = ggml.torch_dtype or "float32"
        tensors.append(
            TensorInfo(
                name,
                dtype,
                shape,
                contiguous_stride(shape),
                0,
                storage,
                tensor_kind(name, dtype),
                kind_source="name",
                encoding=ggml.name if ggml.encoded else None,
                file_dtype=ggml.name,
            )
        )
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise _bad(f"tensors {n0[:200]!r} and {n1[:200]!r} overlap in the data section")
    return tensors
