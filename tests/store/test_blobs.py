"""The blob store's pins: an upload's blob survives deletion until the upload lets go of it."""

from __future__ import annotations

import os
import time

from ckptscope.store.blobs import PIN_TTL_S, BlobStore


def write(store: BlobStore, data: bytes):
    w = store.writer()
    w.write(data)
    return w.commit()


def test_a_pinned_blob_is_kept_until_unpinned(tmp_path):
    store = BlobStore(tmp_path)
    first = write(store, b"same bytes")
    second = write(store, b"same bytes")  # a second upload of the same bytes: its own pin
    assert first.path == second.path and first.pin != second.pin
    assert not store.delete_unless(first.sha256, referenced=lambda: False)
    store.unpin(first)
    assert not store.delete_unless(first.sha256, referenced=lambda: False)  # second still holds it
    store.unpin(second)
    assert not store.delete_unless(first.sha256, referenced=lambda: True)  # the catalogue uses it
    assert store.delete_unless(first.sha256, referenced=lambda: False)
    assert not first.path.exists() and not first.path.parent.exists()
    assert list(store.pin_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_pins_of_crashed_processes_expire(tmp_path):
    store = BlobStore(tmp_path)
    blob = write(store, b"left behind")
    old = time.time() - PIN_TTL_S - 60
    os.utime(blob.pin, (old, old))
    assert store.delete_unless(blob.sha256, referenced=lambda: False)
    assert not blob.pin.exists()


def test_start_up_cleaning_removes_only_old_leftovers(tmp_path):
    store = BlobStore(tmp_path)
    fresh = write(store, b"in flight")
    stale = write(store, b"crashed")
    stale_temp = store.temp_path()
    fresh_temp = store.temp_path()
    # ranges of a referenced object that a killed stats task or export copied (stats/spool.py)
    stale_spool = store.tmp_dir / "ckptscope-ranges-dead.bin"
    fresh_spool = store.tmp_dir / "ckptscope-ranges-live.bin"
    for spool in (stale_spool, fresh_spool):
        spool.write_bytes(b"x" * 10)
    for path, age in ((stale.pin, PIN_TTL_S), (stale_temp, 6 * 3600), (stale_spool, 6 * 3600)):
        old = time.time() - age - 60
        os.utime(path, (old, old))
    store.clean_tmp()
    assert fresh.pin.exists() and fresh_temp.exists() and fresh_spool.exists()
    assert not stale.pin.exists() and not stale_temp.exists() and not stale_spool.exists()
    assert stale.path.exists()  # blobs themselves are only deleted through delete_unless
