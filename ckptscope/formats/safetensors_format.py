"""safetensors: an 8-byte little-endian header length, a JSON header, then raw bytes.

Listing reads the header only. Checks beyond the library's: header size and tensor count
caps, duplicate keys, offsets inside the data area, sizes matching shapes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from ckptscope.errors import CheckpointError

from .gc_pause import paused_gc
from .model import (
    MAX_DIMS,
    PLAIN_DEFAULTS,
    SAFETENSORS_DTYPES,
    Checkpoint,
    DType,
    RootInfo,
    StorageRef,
    TensorInfo,
    contiguous_stride,
    tensor_kind,
)
from .ranged_path import as_path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_TENSORS = 500_000


def _bad(message: str) -> CheckpointError:
    return CheckpointError("corrupt_safetensors", message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _bad(f"safetensors header has duplicate key {key[:200]!r}")
    return out


_SPACED_KEY = re.compile(rb'"\s+:')


def _raw_key_count(raw: bytes) -> int:
    """Keys in the JSON text: every key is a string followed by ':' (maybe after whitespace). A
    duplicate key can only make this larger than the parsed count, never hide; an escaped quote
    before ':' inside a string also makes it larger, which just takes the slow exact path."""
    return raw.count(b'":') + len(_SPACED_KEY.findall(raw))


def _key_count(header: dict[str, Any]) -> int:
    return len(header) + sum(len(v) for v in header.values() if isinstance(v, dict))


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header dict, data start offset, file size)."""
    file_size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise CheckpointError("truncated", "file is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                "limit_exceeded", f"safetensors header of {header_len} bytes exceeds the 100 MiB limit"
            )
        if 8 + header_len > file_size:
            raise CheckpointError("truncated", "safetensors header length points beyond the end of the file")
        raw = fh.read(header_len)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("safetensors header is not valid UTF-8") from None
    try:
        with paused_gc():
            header = json.loads(text)
            if isinstance(header, dict) and _raw_key_count(raw) != _key_count(header):
                header = json.loads(text, object_pairs_hook=_no_duplicates)  # exact, names the duplicate
    except CheckpointError:
        raise
    except RecursionError:
        raise _bad("safetensors header JSON nests too deeply") from None
    except ValueError as exc:
        raise _bad(f"safetensors header is not valid JSON: {exc}"[:300]) from None
    if not isinstance(header, dict):
        raise _bad("safetensors header is not a JSON object")
    return header, 8 + header_len, file_size


def _bad_shape(name: str, value: Any) -> CheckpointError:
    if value.__class__ is not list or len(value) > MAX_DIMS:
        return _bad(f"tensor {name!r} has a malformed shape")
    return _bad(f"tensor {name!r} has a negative or non-integer dimension")


def _metadata(value: Any) -> dict[str, str]:
    """``__metadata__`` as the safetensors library reads it (``Option<HashMap<String, String>>``):
    absent or ``null``, or an object of strings; ``[]``, ``0``, ``""``, ``false`` and non-string
    values are refused, as ``safe_open`` refuses them."""
    if value is None:
        return {}
    if value.__class__ is not dict:
        raise _bad(f"safetensors __metadata__ must be an object of strings, not {_json_type(value)}")
    for key, item in value.items():
        if item.__class__ is not str:
            raise _bad(f"safetensors __metadata__ value of {key[:80]!r} is {_json_type(item)}, not a string")
    metadata: dict[str, str] = value
    return metadata


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(value.__class__, "a number" if value.__class__ is float else "null")


def read_safetensors(path: str | Path) -> Checkpoint:
    """The listing from the header. The loop below is the hot path of a 20,000-tensor listing:
    each entry's checks are spelled inline, and what follows from (dtype, shape) alone (the
    dtype record, the element count, the stride) is worked out once per distinct pair."""
    path = as_path(path)
    header, data_start, file_size = read_header(path)
    raw_meta = _metadata(header.pop("__metadata__", None))
    if len(header) > MAX_TENSORS:
        raise CheckpointError("limit_exceeded", f"safetensors header lists {len(header)} tensors (limit {MAX_TENSORS})")
    data_size = file_size - data_start
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    add_tensor, add_span = tensors.append, spans.append
    spath = str(path)
    # (dtype code, shape) -> (DType, shape tuple, stride, nbytes); shapes hold only exact ints
    # (checked before an entry goes in), so a bool dimension never finds an int shape's entry
    layouts: dict[tuple[Any, ...], tuple[DType, tuple[int, ...], tuple[int, ...], int]] = {}
    new_tensor, new_storage = tuple.__new__, tuple.__new__
    for name, entry in header.items():
        if entry.__class__ is not dict:
            raise _bad(f"tensor {name!r} header entry is not an object")
        code, dims = entry.get("dtype"), entry.get("shape")
        dtype = SAFETENSORS_DTYPES.get(code)  # type: ignore[arg-type]
        if dtype is None:
            raise CheckpointError("unsupported_dtype", f"tensor {name!r} has unsupported dtype {str(code)[:40]!r}")
        if dims.__class__ is not list or len(dims) > MAX_DIMS:
            raise _bad_shape(name, dims)
        for v in dims:
            if v.__class__ is not int or v < 0:
                raise _bad_shape(name, dims)
        key = (code, *dims)
        layout = layouts.get(key)
        if layout is None:
            shape = tuple(dims)
            layout = layouts[key] = (dtype, shape, contiguous_stride(shape), math.prod(shape) * dtype.itemsize)
        dtype, shape, stride, nbytes = layout
        offsets = entry.get("data_offsets")
        if offsets.__class__ is not list or len(offsets) != 2:
            raise _bad(f"tensor {name!r} has data offsets outside the file")
        begin, end = offsets
        if begin.__class__ is not int or end.__class__ is not int or not 0 <= begin <= end <= data_size:
            raise _bad(f"tensor {name!r} has data offsets outside the file")
        if nbytes != end - begin:
            raise _bad(f"tensor {name!r}: shape {list(shape)} of {dtype.name} does not match its {end - begin} bytes")
        add_span((begin, end, name))
        storage = new_storage(StorageRef, (spath, data_start + begin, nbytes, name))
        kind = tensor_kind(name, dtype.name)
        add_tensor(new_tensor(TensorInfo, (name, dtype.name, shape, stride, 0, storage, kind, *PLAIN_DEFAULTS)))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise _bad(f"tensors {n0!r} and {n1!r} overlap in the data area")
        if b1 > e0:  # the safetensors library refuses gaps too
            raise _bad(f"the data area has {b1 - e0} bytes between tensors {n0!r} and {n1!r}")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0] != 0) or end != data_size:
        raise _bad("tensor data does not cover the data area exactly (leading or trailing bytes)")
    return Checkpoint(
        format="safetensors",
        tensors=tensors,
        roots=[RootInfo("", len(tensors))],
        metadata={f"__metadata__.{k}": v for k, v in raw_meta.items()},
        files=[str(path)],
    )
