"""Checkpoint readers: sniff by content, list tensors without reading their bytes.

No FastAPI (and no torch) imports here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ckptscope.errors import CheckpointError

from .dcp import directory_resolver, is_dcp_metadata, read_dcp, read_dcp_directory
from .folder import read_directory, read_folder
from .gc_pause import paused_gc
from .gguf_format import read_gguf
from .model import DTYPES, Checkpoint, RootInfo, StorageRef, TensorInfo
from .ranged_path import as_path
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
    "is_dcp_metadata",
    "open_checkpoint",
    "read_dcp",
    "read_dcp_directory",
    "sniff",
]

_REFUSALS = {
    "empty": ("empty", "the file is empty"),
    "tar": ("legacy_tar", "this is a tar archive (the PyTorch < 0.4 .tar format); it is not supported"),
    "onnx": ("onnx", "this is an ONNX model (an exported graph with its weights); ONNX files are not read"),
    "tf_savedmodel": ("tf_savedmodel", "this is a TensorFlow SavedModel (saved_model.pb); SavedModels are not read"),
    "hdf5": ("hdf5", "this is an HDF5 file (Keras .h5 or TensorFlow weights); HDF5 files are not read"),
    "numpy": ("numpy", "this is a NumPy .npy array; NumPy files are not read"),
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
    if kind == "gguf":
        return read_gguf(path)
    if kind == "json":
        raise CheckpointError("not_checkpoint", "a sharded index cannot be a shard of another index")
    code, message = _REFUSALS[kind]
    raise CheckpointError(code, message)


_DAMAGED = {
    "safetensors": ("corrupt_safetensors", "the safetensors file is damaged"),
    "zip": ("corrupt_zip", "the zip archive is damaged"),
    "pickle": ("corrupt_pickle", "the pickle is damaged"),
    "json": ("corrupt_index", "the sharded index is damaged"),
    "gguf": ("corrupt_gguf", "the GGUF file is damaged"),
}


def open_checkpoint(
    path: str | Path,
    *,
    resolve_shard: ShardResolver | None = None,
    name: str | None = None,
    folder: Mapping[str, Path] | None = None,
) -> Checkpoint:
    """List a checkpoint. ``name`` is the client's file name, used only to tell which shard
    format a sharded index expects; the format itself is always sniffed from content. A directory
    (or ``folder``, an uploaded folder's files by name) is read by ``folder.py``. Whatever goes
    wrong inside a reader ends here as a CheckpointError in our words."""
    path = as_path(path)  # a RangedPath (an object in a store) stays one
    kind = "unknown"
    try:
        if folder is not None or path.is_dir():
            with paused_gc():
                if folder is not None:
                    return read_folder(folder, open_checkpoint)
                return read_directory(path, open_checkpoint)
        kind = sniff(path)
        with paused_gc():
            if kind == "json":
                return read_sharded(path, _open_single, resolve_shard, name)
            if kind == "pickle" and is_dcp_metadata(path):  # a torch.distributed.checkpoint .metadata
                return read_dcp(path, resolve_shard or directory_resolver(path.parent))
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
