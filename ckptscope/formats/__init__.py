"""Checkpoint readers: sniff by content, list tensors without reading their bytes.

No FastAPI (and no torch) imports here.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from ckptscope.errors import CheckpointError

from .gc_pause import paused_gc
from .model import DTYPES, Checkpoint, RootInfo, StorageRef, TensorInfo
from .safetensors_format import read_safetensors
from .sharded import ShardResolver, read_sharded
from .sniff import sniff
from .torch_legacy import read_torch_legacy
from .torch_zip import read_torch_zip

__all__ = [
    "DTYPES",
    "Checkpoint",
    "CheckpointError",
    "RootInfo",
    "StorageRef",
    "TensorInfo",
    "open_checkpoint",
    "sniff",
]

_REFUSALS = {
    "empty": ("empty", "the file is empty"),
    "tar": ("legacy_tar", "this is a tar archive (the PyTorch < 0.4 .tar format); it is not supported"),
    "gguf": ("unsupported_format", "this is a GGUF file (llama.cpp); ckptscope reads safetensors and PyTorch files"),
    "onnx": ("onnx", "this looks like an ONNX model; ckptscope reads safetensors and PyTorch checkpoints"),
    "hdf5": ("unsupported_format", "this is an HDF5 file (Keras .h5); it is not supported"),
    "numpy": ("unsupported_format", "this is a NumPy .npy array; it is not supported"),
    "unknown": (
        "unknown_format",
        "unrecognised file: not safetensors, a PyTorch zip or legacy checkpoint, or a sharded index",
    ),
}


def _open_single(path: Path) -> Checkpoint:
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "zip":
        return read_torch_zip(path)
    if kind == "pickle":
        return read_torch_legacy(path)
    if kind == "json":
        raise CheckpointError("not_checkpoint", "a sharded index cannot be a shard of another index")
    code, message = _REFUSALS[kind]
    raise CheckpointError(code, message)


def open_checkpoint(
    path: str | Path, *, resolve_shard: ShardResolver | None = None, name: str | None = None
) -> Checkpoint:
    """List a checkpoint. ``name`` is the client's file name, used only to tell which shard
    format a sharded index expects; the format itself is always sniffed from content."""
    path = Path(path)
    try:
        with paused_gc():
            if sniff(path) == "json":
                return read_sharded(path, _open_single, resolve_shard, name)
            return _open_single(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, struct.error, EOFError, ValueError, OverflowError) as exc:
        raise CheckpointError("corrupt", f"unreadable file: {type(exc).__name__}: {exc}"[:300]) from None
    except OSError as exc:
        raise CheckpointError("unreadable", f"cannot read the file: {exc.strerror or exc}") from None
