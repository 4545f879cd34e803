"""What `docker stop` does to a server mid-upload, outside Docker: SIGTERM ends the process with
status 0 inside its shutdown grace (CKPTSCOPE_SHUTDOWN_GRACE_S), the partial upload removed; a
server killed outright (SIGKILL) leaves its temp file, which the next start removes, while a temp
file another live server is still writing is kept. An unwritable data directory is one line and a
non-zero exit. (scripts/docker-smoke.sh checks the same in a container.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptscope.store.blobs import BATCH_BYTES, BlobStore
from tests.servers import Server


def start_slow_upload(server: Server, declared: int = 64 << 20) -> socket.socket:
    """A raw upload that declares ``declared`` bytes and sends only two of the blob writer's batches
    (so the first is on disk): in flight until the socket closes."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (
        f"POST /api/v1/checkpoints?filename=slow.bin HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + os.urandom(2 * BATCH_BYTES))
    return sock


def wait_for_temp(tmp_dir: Path) -> list[Path]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        temps = list(tmp_dir.glob("upload-*"))
        if temps and all(p.stat().st_size > 0 for p in temps):
            return temps
        time.sleep(0.05)
    raise AssertionError("the upload's temp file never appeared")


def test_sigterm_mid_upload_exits_0_within_the_grace_and_keeps_no_partial_file(tmp_path):
    server = Server(tmp_path / "data", env={"CKPTSCOPE_SHUTDOWN_GRACE_S": "1"})
    sock = start_slow_upload(server)
    try:
        wait_for_temp(tmp_path / "data" / "tmp")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=9)  # Docker's grace is 10 s
        took = time.monotonic() - started
    finally:
        sock.close()
        server.stop()
    log = server.log()
    assert code == 0, log[-3000:]
    assert took < 8, took  # the 1 s grace, then the lifespan shutdown
    assert "timeout graceful shutdown exceeded" in log and "Traceback" not in log
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_a_killed_servers_partial_upload_is_removed_at_the_next_start(tmp_path):
    data = tmp_path / "data"
    server = Server(data)
    sock = start_slow_upload(server)
    try:
        [left] = wait_for_temp(data / "tmp")
        server.proc.kill()  # no shutdown at all: the temp file stays
        server.proc.wait(timeout=20)
    finally:
        sock.close()
        server.stop()
    assert left.exists()
    # a writer of another live process sharing the data directory: held, so kept
    live = BlobStore(data).writer()
    live.write(b"still arriving")
    again = Server(data)
    try:
        assert not left.exists()
        assert [p.name for p in (data / "tmp").iterdir()] == [live._temp.name]
        live.write(b" and done")
        blob = live.commit()  # the held temp file was never touched
        assert blob.path.read_bytes() == b"still arriving and done"
    finally:
        again.stop()


def test_held_and_unheld_temp_files(tmp_path):
    store = BlobStore(tmp_path)
    crashed = store.tmp_dir / "upload-crashed"
    crashed.write_bytes(b"partial")  # fresh, but nobody holds it
    writer = store.writer()
    writer.write(b"in flight")
    BlobStore(tmp_path).clean_tmp()  # as another process starting on the same data directory
    assert not crashed.exists()
    assert writer._temp.exists()
    writer.abort()
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_an_unwritable_data_dir_is_one_line_and_a_non_zero_exit(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    data = blocker if where == "file" else blocker / "data"
    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(data)}
    result = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ckptscope: data directory {data}: cannot write") and "Traceback" not in result.stderr
