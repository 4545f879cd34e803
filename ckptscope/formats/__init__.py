"""Checkpoint readers: sniff by content, list tensors without reading their bytes.

No FastAPI (and no torch) imports here. Importing the package imports the model and the sniffer
only; each reader is imported when a file of its kind is read (``import_readers`` imports, ahead
of time, the ones a path needs: the sandboxed child does so before it arms its audit hook). The
readers' names are attributes of the package all the same (``from ckptscope.formats import
read_gguf``), imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope.errors import CheckpointError

from .gc_pause import paused_gc
from .model import DTYPES, Checkpoint, RootInfo, StorageRef, TensorInfo
from .ranged_path import as_path, is_ranged
from .sniff import sniff

if TYPE_CHECKING:  # at run time: ``__getattr__``
    from .dcp import directory_resolver as directory_resolver
    from .dcp import is_dcp_metadata as is_dcp_metadata
    from .dcp import read_dcp as read_dcp
    from .dcp import read_dcp_directory as read_dcp_directory
    from .folder import read_directory as read_directory
    from .folder import read_folder as read_folder
    from .gguf_format import read_gguf as read_gguf
    from .safetensors_format import read_safetensors as read_safetensors
    from .sharded import ShardResolver as ShardResolver
    from .sharded import read_sharded as read_sharded
    from .torch_legacy import read_torch_legacy as read_torch_legacy
    from .torch_zip import read_torch_zip as read_torch_zip

__all__ = [
    "DTYPES",
    "Checkpoint",
    "CheckpointError",
    "RootInfo",
    "StorageRef",
    "TensorInfo",
    "import_readers",
    "is_dcp_metadata",
    "open_checkpoint",
    "read_dcp",
    "read_dcp_directory",
    "sniff",
]

# the package's names that live in a reader's module, imported on first use (``__getattr__``)
_LAZY = {
    "directory_resolver": "dcp",
    "is_dcp_metadata": "dcp",
    "read_dcp": "dcp",
    "read_dcp_directory": "dcp",
    "read_directory": "folder",
    "read_folder": "folder",
    "read_gguf": "gguf_format",
    "read_safetensors": "safetensors_format",
    "ShardResolver": "sharded",
    "read_sharded": "sharded",
    "read_torch_legacy": "torch_legacy",
    "read_torch_zip": "torch_zip",
}
# the reader of one file of each sniffed kind (its module: _LAZY)
_SINGLE_READERS = {
    "safetensors": "read_safetensors",
    "zip": "read_torch_zip",
    "pickle": "read_torch_legacy",
    "gguf": "read_gguf",
}
# the reader modules a file of each sniffed kind is read with (a pickle may be a DCP .metadata);
# a directory, an uploaded folder or a sharded index may hold files of any kind: all of them
_KIND_READERS = {kind: (_LAZY[name], *(("dcp",) if kind == "pickle" else ())) for kind, name in _SINGLE_READERS.items()}
_ALL_READERS = tuple(sorted(set(_LAZY.values())))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def import_readers(path: str | Path | None = None) -> None:
    """Import every reader module ``open_checkpoint(path)`` may use: for a file, those of its
    sniffed kind; for a directory, an object in a store, a file that cannot be sniffed, or None,
    all of them. The sandboxed child calls this before it arms its audit hook, which refuses any
    import after (a reader module missing here is a refused parse, never an unguarded import)."""
    modules: tuple[str, ...] = _ALL_READERS
    if path is not None:
        try:
            target = as_path(path)
            if not is_ranged(target) and not target.is_dir():
                kind = sniff(target)
                modules = _ALL_READERS if kind == "json" else _KIND_READERS.get(kind, ())
        except Exception:  # open_checkpoint will say what is wrong with it
            modules = _ALL_READERS
    for module in modules:
        __import__(f"{__name__}.{module}")  # the import statement's way: -X importtime shows it


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
    reader = _SINGLE_READERS.get(kind)
    if reader is not None:
        read: Callable[[Path], Checkpoint] = __getattr__(reader)
        return read(path)
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
            from .folder import read_directory, read_folder

            with paused_gc():
                if folder is not None:
                    return read_folder(folder, open_checkpoint)
                return read_directory(path, open_checkpoint)
        kind = sniff(path)
        with paused_gc():
            if kind == "json":
                from .sharded import read_sharded

                return read_sharded(path, _open_single, resolve_shard, name)
            if kind == "pickle":
                from .dcp import directory_resolver, is_dcp_metadata, read_dcp

                if is_dcp_metadata(path):  # a torch.distributed.checkpoint .metadata
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
