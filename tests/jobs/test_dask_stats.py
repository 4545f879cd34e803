"""Stats fanned out to Dask distributed: a LocalCluster of 2 worker processes gives exactly the local
engine's results, also when a worker dies mid-job; progress and cancellation work."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from ckptscope.errors import CkptscopeError, Invalid, SourceUnreachable
from ckptscope.formats import open_checkpoint
from ckptscope.jobs import dask_stats
from ckptscope.jobs.dask_stats import close_local_clusters, compute_stats_dask
from ckptscope.stats.engine import StatsCancelled, compute_stats
from ckptscope.stats.spool import LocalFileReader, plan_range_tasks
from tests import factories as f
from tests.stats.test_spool import URL, as_urls, assert_identical

pytestmark = pytest.mark.slow

SCHEDULER = "local:2"
TASK_BYTES = 128 << 10


class LoggingReader:
    """Copies every range from the real file (paths are URLs, as from an object store) and logs
    each read to a file of its worker process's own, so the test sees what the workers read."""

    def __init__(self, log_dir: str, delay_s: float = 0.0, fail: bool = False) -> None:
        self.log_dir = log_dir
        self.delay_s = delay_s
        self.fail = fail

    def local_path(self, path: str) -> str | None:
        return None

    def before_copy(self) -> None:
        pass

    def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
        self.before_copy()
        if self.fail:
            raise ValueError(f"no such key: {path}")
        time.sleep(self.delay_s)
        with open(path.removeprefix(URL), "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
        out.write(data)
        with open(Path(self.log_dir) / f"reads-{os.getpid()}.log", "a") as log:
            log.write(f"{path}\t{start}\t{end}\n")
        return len(data)


class KillingReader(LoggingReader):
    """The first copy on the cluster (a marker file says which was first) kills its own worker
    process, mid-task."""

    def before_copy(self) -> None:
        marker = Path(self.log_dir) / "killed"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def reads(log_dir: Path) -> list[tuple[str, int, int]]:
    out = []
    for log in log_dir.glob("reads-*.log"):
        for line in log.read_text().splitlines():
            path, start, end = line.split("\t")
            out.append((path, int(start), int(end)))
    return sorted(out)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    tensors = {f"layers.{i}.weight": torch.randn(200 + 10 * i, 96, generator=g) for i in range(8)}
    tensors["layers.3.weight"][4, 4] = float("nan")
    tensors |= {f"layers.{i}.bias": torch.randn(96, generator=g) for i in range(8)}
    tensors["embed"] = torch.randn(2000, 64, generator=g).bfloat16()
    tensors["big"] = torch.randn(300_000, generator=g)  # bigger than a task
    tensors["steps"] = torch.arange(500)
    index = f.sharded_safetensors(tmp_path_factory.mktemp("sharded"), tensors, shards=3)
    listing = open_checkpoint(index).tensors
    assert len({t.storage.path for t in listing}) == 3
    return [as_urls(t) for t in listing], compute_stats(listing)  # listed by an object store


@pytest.fixture(scope="module", autouse=True)
def cluster():
    yield
    close_local_clusters()


def test_a_local_cluster_gives_the_local_engines_results(sharded, tmp_path):
    tensors, want = sharded
    seen: list[tuple[int, int]] = []
    got = compute_stats_dask(
        tensors,
        LoggingReader(str(tmp_path)),
        SCHEDULER,
        progress=lambda d, t: seen.append((d, t)),
        max_task_bytes=TASK_BYTES,
    )
    assert_identical(got, want)
    tasks = plan_range_tasks(tensors, max_task_bytes=TASK_BYTES)
    assert len(tasks) > 4
    assert reads(tmp_path) == sorted(r for task in tasks for r in task.ranges)  # each range once
    assert len(list(tmp_path.glob("reads-*.log"))) == 2  # both workers took part
    total = sum(t.nbytes for t in tensors)
    assert len(seen) == len(tasks) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_workers_map_a_shared_path_where_it_lies(sharded):
    tensors, want = sharded
    local = [t._replace(storage=t.storage._replace(path=t.storage.path.removeprefix(URL))) for t in tensors]
    assert_identical(compute_stats_dask(local, LocalFileReader(), SCHEDULER, max_task_bytes=TASK_BYTES), want)


def test_a_worker_killed_mid_task_is_retried_without_a_wrong_or_partial_result(sharded, tmp_path):
    tensors, want = sharded
    got = compute_stats_dask(tensors, KillingReader(str(tmp_path)), SCHEDULER, max_task_bytes=TASK_BYTES)
    assert (tmp_path / "killed").exists()  # a worker did die, mid-task
    assert_identical(got, want)
    tasks = plan_range_tasks(tensors, max_task_bytes=TASK_BYTES)
    # the killed task read nothing before dying; every range was read once, by a living worker
    assert reads(tmp_path) == sorted(r for task in tasks for r in task.ranges)


def test_cancellation_stops_the_job(sharded, tmp_path):
    tensors, _ = sharded
    tasks = plan_range_tasks(tensors, max_task_bytes=TASK_BYTES)
    seen: list[int] = []
    with pytest.raises(StatsCancelled):
        compute_stats_dask(
            tensors,
            LoggingReader(str(tmp_path), delay_s=0.4),
            SCHEDULER,
            progress=lambda d, t: seen.append(d),
            cancelled=lambda: bool(seen),
            max_task_bytes=TASK_BYTES,
        )
    time.sleep(1.0)  # what was running when it was cancelled has finished by now; nothing more starts
    assert len(reads(tmp_path)) < len(tasks) - 2


def test_a_task_error_is_one_line_naming_the_scheduler(sharded, tmp_path):
    tensors, _ = sharded
    with pytest.raises(CkptscopeError) as caught:
        compute_stats_dask(tensors, LoggingReader(str(tmp_path), fail=True), SCHEDULER, retries=0)
    message = str(caught.value)
    assert "\n" not in message and SCHEDULER in message and "no such key" in message
    assert caught.value.code == "dask_task_failed"


def test_bad_and_unreachable_schedulers_are_clear_errors(sharded, tmp_path, monkeypatch):
    tensors, _ = sharded
    for bad in ("local:0", "local:x", "http://h:1", "tcp://"):
        with pytest.raises(Invalid, match="Dask scheduler"):
            compute_stats_dask(tensors, LoggingReader(str(tmp_path)), bad)
    monkeypatch.setattr(dask_stats, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(SourceUnreachable, match=r"tcp://127\.0\.0\.1:9"):
        compute_stats_dask(tensors, LoggingReader(str(tmp_path)), "tcp://127.0.0.1:9")


def test_without_the_dask_extra_it_says_which_to_install(sharded, tmp_path, monkeypatch):
    tensors, _ = sharded
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(Invalid, match=r"pip install 'ckptscope\[dask\]'"):
        compute_stats_dask(tensors, LoggingReader(str(tmp_path)), SCHEDULER)
