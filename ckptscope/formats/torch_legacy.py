"""Legacy (pre-1.6, non-zip) PyTorch checkpoints: a run of pickles followed by raw storages."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from ckptscope.errors import CheckpointError

from .model import DTYPES, Checkpoint, StorageRef
from .pickle_graph import WorkBudget
from .pickled_tree import build_checkpoint
from .torch_pickle import PickledStorage, PickleReader
from .torch_zip import MAX_PICKLE_BYTES

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def read_torch_legacy(path: str | Path) -> Checkpoint:
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as raw:
        # the pickles sit at the front, the storages after them: read a bounded head into memory
        # so no length claimed inside a pickle can make a read larger than that
        head = raw.read(min(file_size, MAX_PICKLE_BYTES))
        fh = io.BytesIO(head)
        reader = PickleReader(WorkBudget.for_bytes(len(head)))  # one budget for the file's five pickles
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
