"""Identify a file by its first bytes, never by its name."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from .ranged_path import as_path

SNIFF_BYTES = 512


def sniff(path: str | Path) -> str:
    """One of: safetensors, zip, pickle, json, tar, gguf, onnx, tf_savedmodel, hdf5, numpy, empty,
    unknown."""
    with as_path(path).open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
        protobuf = _protobuf_kind(fh) if head[:1] in (b"\x08", b"\x12") else None
        hdf5_later = not head.startswith(_HDF5) and _hdf5_after_user_block(fh)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:4] == b"GGUF":  # before safetensors: a GGUF file of 123 tensors has "{" at byte 8
        return "gguf"
    if protobuf is not None:  # before safetensors: a protobuf's byte 8 can be "{"; the walk is strict
        return protobuf
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] == b"{":
        return "json"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(_HDF5) or hdf5_later:
        return "hdf5"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    return "unknown"


_HDF5 = b"\x89HDF\r\n\x1a\n"


def _hdf5_after_user_block(fh: BinaryIO) -> bool:
    """HDF5's signature may also sit after a user block, at 512, 1024, 2048 ... bytes."""
    for offset in (512, 1024, 2048, 4096, 8192):
        fh.seek(offset)
        if fh.read(8) == _HDF5:
            return True
    return False


# --- protobuf: an ONNX ModelProto or a TensorFlow SavedModel -----------------------------------
# Both start with field 1 as a varint (ONNX ir_version, SavedModel saved_model_schema_version).
# A few top-level fields are walked (length-delimited payloads are skipped by seeking, never read
# whole) and must all be fields of the message, with the right wire types.

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# ModelProto: ir_version, producer_name, producer_version, domain, model_version, doc_string,
# graph, opset_import, metadata_props, training_info, functions, configuration
_ONNX_FIELDS = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 7: _LEN, 8: _LEN, 14: _LEN, 20: _LEN}
_ONNX_FIELDS |= {25: _LEN, 26: _LEN}
_ONNX_TEXT = (2, 3, 4)  # producer_name, producer_version, domain
# the first tag of a GraphProto (node, name, initializer, doc_string, input, output, value_info,
# quantization_annotation, sparse_initializer, metadata_props) and of an OperatorSetIdProto
_GRAPH_TAGS = frozenset({0x0A, 0x12, 0x2A, 0x52, 0x5A, 0x62, 0x6A, 0x72, 0x8A, 0x92})
_OPSET_TAGS = frozenset({0x0A, 0x10})
# SavedModel: saved_model_schema_version, meta_graphs (MetaGraphDef, whose fields 1-8 are messages)
_SAVEDMODEL_FIELDS = {1: _VARINT, 2: _LEN}
_META_GRAPH_TAGS = frozenset((n << 3) | _LEN for n in range(1, 9))
_MAX_FIELDS = 64


class _Field:
    __slots__ = ("number", "wire", "value", "offset")

    def __init__(self, number: int, wire: int, value: int, offset: int) -> None:
        self.number, self.wire, self.value, self.offset = number, wire, value, offset


def _varint(fh: BinaryIO) -> int | None:
    result = 0
    for shift in range(0, 70, 7):
        byte = fh.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
    return None


def _walk_fields(fh: BinaryIO, size: int) -> tuple[list[_Field], bool]:
    """The first top-level fields (up to the first byte that is not one), and whether the walk
    ended exactly at the end of the file."""
    fields: list[_Field] = []
    position = 0
    fh.seek(0)
    while position < size and len(fields) < _MAX_FIELDS:
        tag = _varint(fh)
        if tag is None or tag >> 3 == 0:
            return fields, False
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value = _varint(fh)
            if value is None:
                return fields, False
            fields.append(_Field(number, wire, value, fh.tell()))
        elif wire in (_LEN, _I64, _I32):
            length = _varint(fh) if wire == _LEN else (8 if wire == _I64 else 4)
            start = fh.tell()
            if length is None or start + length > size:
                return fields, False
            fields.append(_Field(number, wire, length, start))
            fh.seek(start + length)
        else:  # groups (3, 4) and reserved wire types belong to neither message
            return fields, False
        position = fh.tell()
    return fields, position == size


def _printable(fh: BinaryIO, field: _Field) -> bool:
    if not 0 < field.value <= 256:
        return False
    fh.seek(field.offset)
    try:
        return fh.read(field.value).decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def _first_byte(fh: BinaryIO, field: _Field) -> int | None:
    if field.value <= 0:
        return None
    fh.seek(field.offset)
    return fh.read(1)[0]


def _protobuf_kind(fh: BinaryIO) -> str | None:
    size = fh.seek(0, 2)
    fields, at_end = _walk_fields(fh, size)
    if not fields:
        return None
    numbers = [f.number for f in fields]
    first = fields[0]
    if first.number == 1 and 1 <= first.value <= 64 and all(_ONNX_FIELDS.get(f.number) == f.wire for f in fields):
        models = [f for f in fields if f.number in (7, 8)]  # a graph or an opset import: a model
        if models and all(_first_byte(fh, f) in (_GRAPH_TAGS if f.number == 7 else _OPSET_TAGS) for f in models):
            return "onnx"
        texts = [f for f in fields if f.number in _ONNX_TEXT]
        if len(texts) >= 2 and all(_printable(fh, f) for f in texts):  # producer name and version
            return "onnx"
    if at_end or len(fields) == _MAX_FIELDS:
        if all(_SAVEDMODEL_FIELDS.get(f.number) == f.wire for f in fields) and 2 in numbers:
            graph = next(f for f in fields if f.number == 2)
            if _first_byte(fh, graph) in _META_GRAPH_TAGS:
                return "tf_savedmodel"
    return None
