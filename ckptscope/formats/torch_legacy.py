"""Legacy (pre-1.6, non-zip) PyTorch checkpoints: a run of pickles followed by raw storages."""

from __future__ import annotations

import struct
from pathlib import Path

from ckptscope.errors import CheckpointError

from .model import DTYPES, Checkpoint, StorageRef
from .pickle_graph import WorkBudget
from .pickled_tree import build_checkpoint
from .ranged_path import as_path, head_stream, will_read
from .torch_pickle import PickledStorage, PickleReader
from .torch_zip import MAX_PICKLE_BYTES

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _length_fields(keys: list[str], storages: dict[str, PickledStorage], position: int) -> list[tuple[int, int]]:
    """Where the loop below reads each storage's 8-byte length (as far as the storages are
    known): a ranged file fetches them all in one round."""
    ranges = []
    for key in keys:
        storage = storages.get(key)
        dtype = DTYPES.get(storage.dtype or "uint8") if storage is not None else None
        if storage is None or dtype is None or not isinstance(storage.numel, int):
            break
        ranges.append((position, position + 8))
        position += 8 + storage.numel * dtype.itemsize
    return ranges


def read_torch_legacy(path: str | Path) -> Checkpoint:
    path = as_path(path)
    file_size = path.stat().st_size
    with path.open("rb") as raw:
        # the pickles sit at the front, the storages after them: read a bounded head into memory
        # so no length claimed inside a pickle can make a read larger than that (in a store: a
        # view of the head, whose bytes are fetched as far as the unpickler gets)
        head_size = min(file_size, MAX_PICKLE_BYTES)
        fh = head_stream(raw, head_size)
        reader = PickleReader(WorkBudget.for_bytes(head_size))  # one budget for the file's five pickles
        magic, _ = reader.load(fh)
        if magic != MAGIC_NUMBER:
            raise CheckpointError(
                "plain_pickle",
                "this is a plain Python pickle, not a PyTorch checkpoint; pickles can run code and are not read",
            )
        version, _ = reader.load(fh)
        if version != PROTOCOL_VERSION:
            raise CheckpointError("corrupt_pickle", f"unknown legacy PyTorch protocol version {version!r}")
        sys_info, _ = reader.load(fh)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError("unsupported_byteorder", "big-endian legacy checkpoints are not supported")
        obj, storages = reader.load(fh)
        keys, _ = reader.load(fh)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError("corrupt_pickle", "legacy checkpoint has a malformed storage key list")
        located: dict[str, StorageRef] = {}
        position = fh.tell()
        if position >= MAX_PICKLE_BYTES:
            raise CheckpointError("limit_exceeded", "legacy checkpoint pickles exceed the 256 MiB limit")
        will_read(raw, _length_fields(keys, storages, position))
        for key in keys:
            storage = storages.get(key)
            if storage is None or key in located:
                raise CheckpointError("corrupt_pickle", f"legacy storage list names unknown or repeated key {key!r}")
            raw.seek(position)
            header = raw.read(8)
            if len(header) != 8:
                raise CheckpointError("truncated", "legacy checkpoint ends before its storages")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise CheckpointError(
                    "corrupt_pickle", f"storage {key!r} declares {storage.numel} elements but its data holds {numel}"
                )
            nbytes = storage.numel * DTYPES[storage.dtype or "uint8"].itemsize
            if position + 8 + nbytes > file_size:
                raise CheckpointError("truncated", f"storage {key!r} extends beyond the end of the file")
            located[key] = StorageRef(str(path), position + 8, nbytes, key)
            position += 8 + nbytes

    def locate(storage: PickledStorage) -> StorageRef:
        key = storage.root_key or storage.key
        if key not in located:
            raise CheckpointError("corrupt_pickle", f"storage {key!r} has no data in the file")
        return located[key]

    checkpoint = build_checkpoint(obj, "torch-legacy", locate, [str(path)])
    checkpoint.pickle = reader.report()
    return checkpoint
