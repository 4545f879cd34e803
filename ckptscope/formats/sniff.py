"""Identify a file by its first bytes, never by its name."""

from __future__ import annotations

from pathlib import Path

SNIFF_BYTES = 512


def sniff(path: str | Path) -> str:
    """One of: safetensors, zip, pickle, json, tar, gguf, onnx, hdf5, numpy, empty, unknown."""
    with Path(path).open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] == b"{":
        return "json"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    if head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head or b"ai.onnx" in head):
        return "onnx"
    return "unknown"
