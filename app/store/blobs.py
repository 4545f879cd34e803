"""Content-addressed blob store: files named by their sha256, written atomically.

Bytes stream into a temp file in the store's own ``tmp/`` (same filesystem), are hashed as
they arrive, fsynced, then renamed into place. An aborted write leaves nothing behind.
Client file names are never used as paths.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Blob:
    sha256: str
    size: int
    path: Path


class BlobWriter:
    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self._store = store
        self._limit = limit
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self._temp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            self.abort()
            raise TooLarge(self._limit)
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> Blob:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha = self._hash.hexdigest()
        final = self._store.path_for(sha)
        if final.exists():
            self._temp.unlink()
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._temp, final)
            _fsync_dir(final.parent)
        return Blob(sha, self.size, final)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._temp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.blob_dir / sha256[:2] / sha256

    def writer(self, limit: int | None = None) -> BlobWriter:
        return BlobWriter(self, limit)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in the store's temp directory, for a file the server writes itself."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def adopt(self, temp: Path) -> Blob:
        """Move a finished (fsynced) file from the temp directory into the store."""
        digest = hashlib.sha256()
        size = 0
        with temp.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        sha = digest.hexdigest()
        final = self.path_for(sha)
        if final.exists():
            temp.unlink()
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            _fsync_dir(final.parent)
        return Blob(sha, size, final)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def delete(self, sha256: str) -> None:
        path = self.path_for(sha256)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # only succeeds when no other blob shares the prefix directory
        except OSError:
            pass

    def clean_tmp(self, older_than_s: float = 6 * 3600) -> None:
        """Remove temp files a crashed process left behind (called at start-up). Only old ones:
        another server process sharing the data directory may be mid-upload."""
        cutoff = time.time() - older_than_s
        for leftover in self.tmp_dir.glob("upload-*"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except FileNotFoundError:
                pass
