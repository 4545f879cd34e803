"""Checkpoint readers: sniff by content, list tensors without reading their bytes.

No FastAPI (and no torch) imports here.
"""

from __future__ import annotations

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


_DAMAGED = {
    "safetensors": ("corrupt_safetensors", "the safetensors file is damaged"),
    "zip": ("corrupt_zip", "the zip archive is damaged"),
    "pickle": ("corrupt_pickle", "the pickle is damaged"),
    "json": ("corrupt_index", "the sharded index is damaged"),
}


def open_checkpoint(
    path: str | Path, *, resolve_shard: ShardResolver | None = None, name: str | None = None
) -> Checkpoint:
    """List a checkpoint. ``name`` is the client's file name, used only to tell which shard
    format a sharded index expects; the format itself is always sniffed from content. Whatever
    goes wrong inside a reader ends here as a CheckpointError in our words."""
    path = Path(path)
    kind = "unknown"
    try:
        kind = sniff(path)
        with paused_gc():
            if kind == "json":
                return read_sharded(path, _open_single, resolve_shard, name)
            return _open_single(path)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError("unreadable", f"cannot read the file: {exc.strerror or 'input/output error'}") from None
    except MemoryError:
        raise CheckpointError("limit_exceeded", "reading the file needs more memory than allowed") from None
    except RecursionError:
        code, what = _DAMAGED.get(kind, ("corrupt", "the file is damaged"))
        raise CheckpointError(code, f"{what}: it nests too deeply") from None
    except Exception:  # a reader met bytes it did not expect: never Python's words in the answer
        code, what = _DAMAGED.get(kind, ("corrupt", "the file is damaged"))
        raise CheckpointError(code, f"{what}: its structure does not follow the format") from None
