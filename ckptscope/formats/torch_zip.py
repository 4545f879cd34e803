"""PyTorch zip checkpoints (``torch.save`` since 1.6): validated before anything is unpickled."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from ckptscope.errors import CheckpointError

from .model import Checkpoint, StorageRef
from .pickled_tree import build_checkpoint
from .torch_pickle import PickledStorage, unpickle_restricted

MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _bad_zip(message: str) -> CheckpointError:
    return CheckpointError("corrupt_zip", message)


def _data_offset(fh, info: zipfile.ZipInfo, file_size: int) -> int:  # type: ignore[no-untyped-def]
    """Byte offset of an entry's data, read from its local header (which must agree with the
    central directory)."""
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise _bad_zip(f"zip entry {info.filename!r} has a truncated local header")
    sig, _ver, flags, method, _t, _d, _crc, _cs, _us, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if sig != b"PK\x03\x04":
        raise _bad_zip(f"zip entry {info.filename!r} has no local header where the directory says")
    name = fh.read(name_len)
    if name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != info.filename:
        raise _bad_zip(f"zip entry {info.filename!r} has a different name in its local header")
    if method != info.compress_type:
        raise _bad_zip(f"zip entry {info.filename!r} has a different compression in its local header")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.file_size > file_size:
        raise _bad_zip(f"zip entry {info.filename!r} extends beyond the end of the file")
    return int(offset)


def read_torch_zip(path: str | Path) -> Checkpoint:
    path = Path(path)
    file_size = path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _bad_zip(f"not a readable zip archive: {exc}") from None
    with archive, path.open("rb") as fh:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise _bad_zip("zip archive has duplicate entry names")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                "torchscript",
                "this is a TorchScript archive (torch.jit.save); it holds code as well as weights "
                "and is not read. Save model.state_dict() with torch.save instead",
            )
        if len(pickles) != 1:
            what = "no data.pkl" if not pickles else "more than one data.pkl"
            raise CheckpointError("not_torch_zip", f"zip archive is not a PyTorch checkpoint ({what})")
        prefix = pickles[0][: -len("data.pkl")]
        total = 0
        entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.flag_bits & 0x1:
                raise _bad_zip(f"zip entry {info.filename!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _bad_zip(
                    f"zip entry {info.filename!r} is compressed; PyTorch checkpoints store every entry uncompressed"
                )
            if info.compress_size != info.file_size:  # stored: the two sizes are one
                raise _bad_zip(f"zip entry {info.filename!r} declares two different sizes for its stored bytes")
            total += info.file_size
            entries[info.filename] = info
        if total > file_size:
            raise _bad_zip("zip entries declare more bytes than the file holds")
        byteorder_info = entries.get(prefix + "byteorder")
        if byteorder_info is not None:
            order = archive.read(byteorder_info)[:16]
            if order != b"little":
                raise CheckpointError(
                    "unsupported_byteorder", f"checkpoint byte order {order!r} is not supported (only little-endian)"
                )
        pkl_info = entries[pickles[0]]
        if pkl_info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError("limit_exceeded", "data.pkl is larger than the 256 MiB limit")
        fh.seek(_data_offset(fh, pkl_info, file_size))
        obj, storages = unpickle_restricted(fh.read(pkl_info.file_size))

        located: dict[str, StorageRef] = {}

        def locate(storage: PickledStorage) -> StorageRef:
            key = storage.root_key or storage.key
            if key in located:
                return located[key]
            root = storages[key]
            info = entries.get(f"{prefix}data/{key}")
            if info is None:
                raise _bad_zip(f"storage {key!r} has no data entry in the archive")
            if info.file_size != root.nbytes:
                raise _bad_zip(f"storage {key!r} declares {root.nbytes} bytes but its entry holds {info.file_size}")
            ref = StorageRef(str(path), _data_offset(fh, info, file_size), root.nbytes, key)
            located[key] = ref
            return ref

        checkpoint = build_checkpoint(obj, "torch-zip", locate, [str(path)])
        checkpoint.metadata.update(_ckptscope_metadata(archive, entries.get(prefix + "ckptscope.json")))
        return checkpoint


def _ckptscope_metadata(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> dict[str, str]:
    """Provenance that ckptscope's own exports store beside data.pkl (torch ignores the entry)."""
    if info is None or info.file_size > MAX_METADATA_BYTES:
        return {}
    try:
        data = json.loads(archive.read(info))
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and k.startswith("ckptscope.") and isinstance(v, str)}
