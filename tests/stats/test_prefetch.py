"""Reading ahead of the stats workers: the prefetcher asks for the work's byte ranges in the
workers' order, never more than its window beyond what they have started."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.stats import prefetch
from ckptscope.stats.engine import compute_stats
from ckptscope.stats.prefetch import Prefetcher, ranges_of

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")


class Advice:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        real = os.posix_fadvise

        def record(fd: int, offset: int, length: int, advice: int) -> None:
            if advice == os.POSIX_FADV_WILLNEED:
                with self.lock:
                    self.calls.append((offset, length))
            real(fd, offset, length, advice)

        monkeypatch.setattr(prefetch.os, "posix_fadvise", record)
        # the files these tests write are in the page cache, which the prefetcher would skip
        # (tested on its own below): here every range counts as not cached
        monkeypatch.setattr(prefetch, "cached", lambda fd, offset, length: False)

    def issued(self) -> int:
        with self.lock:
            return sum(length for _, length in self.calls)


def _settle(advice: Advice) -> int:
    for _ in range(100):  # the thread has nothing left to do once it stops advancing
        before = advice.issued()
        time.sleep(0.02)
        if advice.issued() == before:
            return before
    return advice.issued()


def test_a_batch_of_adjacent_tensors_is_one_range_in_file_order(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.zeros(50), "c": torch.zeros(10)}, str(path))
    tensors = sorted(open_checkpoint(path).tensors, key=lambda t: t.data_offset)
    (batch,) = ranges_of([tensors])
    start = tensors[0].data_offset
    assert batch == [(str(path), start, 160 * 4)]
    assert ranges_of([[t] for t in tensors]) == [[(str(path), t.data_offset, t.nbytes)] for t in tensors]


def test_the_window_follows_the_workers(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(10 << 20))
    items = [[(str(path), i << 20, 1 << 20)] for i in range(10)]  # ten 1 MiB work items
    advice = Advice(monkeypatch)
    with Prefetcher(items, ahead=3 << 20) as ahead:
        assert _settle(advice) == 3 << 20  # nothing started yet: the first three items
        ahead.started(0)
        assert _settle(advice) == 4 << 20
        ahead.started(0)  # an item counts once
        ahead.started(5)  # out of order: its bytes count towards the window all the same
        assert _settle(advice) == 5 << 20
        for i in range(10):
            ahead.started(i)
        assert _settle(advice) == 10 << 20
    assert sorted(advice.calls) == [(i << 20, 1 << 20) for i in range(10)]


def test_leaving_early_stops_the_thread_and_a_missing_file_is_left_to_the_workers(tmp_path, monkeypatch):
    advice = Advice(monkeypatch)
    items = [[(str(tmp_path / "gone.bin"), 0, 1 << 20)], [(str(tmp_path / "gone.bin"), 1 << 20, 64 << 20)]]
    with Prefetcher(items, ahead=1 << 20) as ahead:
        pass
    assert not ahead._thread.is_alive() and advice.calls == []


def test_stats_read_ahead_of_the_workers_and_give_the_same_results(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(3)
    save_file({f"w{i}": torch.randn(512, 1024, generator=g) for i in range(6)}, str(path))
    tensors = open_checkpoint(path).tensors
    advice = Advice(monkeypatch)
    with_prefetch = compute_stats(tensors)
    assert advice.issued() == sum(t.nbytes for t in tensors)
    monkeypatch.setattr(prefetch.Prefetcher, "__enter__", lambda self: self)
    assert compute_stats(tensors) == with_prefetch


_FADVISE = os.posix_fadvise if hasattr(os, "posix_fadvise") else None  # before any test patches it


def _evict(path) -> bool:
    """Drops the file's pages from the page cache; False where this filesystem keeps them (tmpfs)."""
    assert _FADVISE is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        _FADVISE(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return not prefetch.cached(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv(RWF_NOWAIT) here")
def test_a_range_in_the_page_cache_is_not_asked_for_again(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4 << 20)  # every page read: resident
        assert prefetch.cached(fd, 0, 4 << 20)
        assert not prefetch.cached(fd, 0, 8 << 20)  # its last page lies past the end of the file
    finally:
        os.close(fd)
    calls: list[int] = []
    monkeypatch.setattr(prefetch.os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(offset))
    items = [[(str(path), i << 20, 1 << 20)] for i in range(4)]
    with Prefetcher(items) as ahead:
        for i in range(4):
            ahead.started(i)
    assert calls == []  # warm: no advice
    if not _evict(path):
        pytest.skip("this filesystem keeps the pages in memory (tmpfs): nothing to read ahead")
    with Prefetcher(items[-1:]) as ahead:  # one step, evicted: asked for (a later step could be
        ahead.started(0)  # resident by then, read ahead by the kernel after the first)
    assert calls == [3 << 20]
