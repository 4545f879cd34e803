"""The blob writer's pipeline: pieces gathered into batches, hashed on one thread and written on
another, one fsync at commit. What it stores and names must be exactly what was written; an
abort, a refusal or a failed write leaves no temp file and no thread behind."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading

import pytest

from ckptscope.errors import TooLarge
from ckptscope.store.blobs import BATCH_BYTES, BlobStore


def blob_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blob-")]


def pieces(data: bytes, sizes: list[int]):
    """``data`` cut into pieces of the given sizes in turn, as read-only views (as an upload's body
    chunks and multipart slices come)."""
    view, at, i = memoryview(data), 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        yield view[at : at + size]
        at, i = at + size, i + 1


@pytest.mark.parametrize("sizes", [[65536], [1, 4095, 70001, 3 << 20], [BATCH_BYTES + 17]])
def test_what_is_stored_and_named_is_what_was_written(tmp_path, sizes):
    store = BlobStore(tmp_path)
    data = os.urandom(3 * BATCH_BYTES + 12345)  # several batches and a partial last one
    writer = store.writer()
    for piece in pieces(data, sizes):
        writer.write(piece)
    assert len(blob_threads()) == 2  # hashing and writing while the bytes still arrive
    blob = writer.commit()
    assert blob.sha256 == hashlib.sha256(data).hexdigest() and blob.size == len(data)
    assert blob.path.read_bytes() == data
    assert blob_threads() == [] and list(store.tmp_dir.iterdir()) == []


def test_a_file_smaller_than_a_batch_starts_no_thread(tmp_path):
    writer = BlobStore(tmp_path).writer()
    writer.write(b"small")
    writer.write(memoryview(b" and done"))
    assert blob_threads() == []
    blob = writer.commit()
    assert blob.path.read_bytes() == b"small and done"
    assert blob.sha256 == hashlib.sha256(b"small and done").hexdigest()


def test_bytes_that_may_change_are_copied_when_taken(tmp_path):
    writer = BlobStore(tmp_path).writer()
    buffer = bytearray(b"first")
    writer.write(buffer)
    writer.write(memoryview(buffer))  # a writable view: copied too
    buffer[:] = b"XXXXX"
    assert writer.commit().path.read_bytes() == b"firstfirst"


def test_an_abort_mid_way_removes_the_temp_file_and_stops_the_threads(tmp_path):
    store = BlobStore(tmp_path)
    writer = store.writer()
    for piece in pieces(os.urandom(5 * BATCH_BYTES), [1 << 20]):
        writer.write(piece)
    assert len(blob_threads()) == 2 and len(list(store.tmp_dir.iterdir())) == 1
    writer.abort()
    assert blob_threads() == [] and list(store.tmp_dir.iterdir()) == []
    writer.abort()  # a second abort (the route's handler after a refusal) is harmless


def test_the_cap_refuses_while_streaming_and_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path)
    limit = 2 * BATCH_BYTES + 5
    writer = store.writer(limit)
    with pytest.raises(TooLarge):
        for piece in pieces(os.urandom(3 * BATCH_BYTES), [1 << 20]):
            writer.write(piece)
    assert writer.size > limit
    assert blob_threads() == [] and list(store.tmp_dir.iterdir()) == []


FAILING_WRITE = """
import errno, os, resource, signal, sys, threading
from ckptscope.store.blobs import BATCH_BYTES, BlobStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
store = BlobStore(__import__("pathlib").Path(sys.argv[1]))
writer = store.writer()
resource.setrlimit(resource.RLIMIT_FSIZE, (BATCH_BYTES + 1000, resource.RLIM_INFINITY))
piece = os.urandom(1 << 20)
try:
    for _ in range(12):
        writer.write(piece)
    writer.commit()
except OSError as exc:
    writer.abort()
    left = os.listdir(store.tmp_dir)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("blob-")]
    print(type(exc).__name__, errno.errorcode[exc.errno], len(left), len(threads))
"""


def test_a_failed_write_on_the_thread_is_raised_as_the_os_error(tmp_path):
    # a real failure of write(2): the file size limit (RLIMIT_FSIZE), set in a child process
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(store)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OSError", errno.errorcode[errno.EFBIG], "0", "0"], out.stdout + out.stderr
