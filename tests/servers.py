"""Real ckptscope servers (uvicorn in a subprocess, on a free loopback port) for end-to-end tests.

``slow_stats_s`` starts the server through ``tests.slow_server``, which sleeps that long before each
tensor's stats, so a test can act while a stats job is running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, slow_stats_s: float = 0.0) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        full_env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(data_dir), **(env or {})}
        module = "ckptscope.cli"
        if slow_stats_s:
            module = "tests.slow_server"
            full_env["CKPTSCOPE_TEST_SLOW_STATS_S"] = str(slow_stats_s)
        root = Path(__file__).resolve().parent.parent
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--port", str(self.port)],
            env=full_env,
            cwd=root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("server did not start: " + self.log()) from None
                time.sleep(0.1)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Any:
        """(status, parsed JSON or None) of one call."""
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, (json.loads(raw) if raw else None)

    def upload(self, path: Path, name: str | None = None) -> dict:
        status, body = self.request(
            "POST",
            f"/api/v1/checkpoints?filename={name or path.name}",
            path.read_bytes(),
            {"Content-Type": "application/octet-stream"},
        )
        assert status == 201 or status == 200, (status, body)
        return body

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return body

    def terminate(self, timeout: float = 40) -> bool:
        """SIGTERM (what docker stop sends); True when the process then shut down gracefully. uvicorn
        finishes its shutdown, then re-raises the signal, so the exit status is 0 or -SIGTERM."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()
