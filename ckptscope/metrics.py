"""Prometheus text-format metrics kept in process (each server process reports its own)."""

from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._summaries: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # count, sum

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            summary = self._summaries[name]
            summary[0] += 1
            summary[1] += value

    HELP = {
        "ckptscope_http_requests_total": "HTTP requests by method and status class",
        "ckptscope_http_errors_total": "HTTP responses with a 5xx status",
        "ckptscope_uploads_total": "checkpoints accepted",
        "ckptscope_upload_bytes_total": "bytes of accepted checkpoints",
        "ckptscope_uploads_rejected_total": "uploads refused, by reason",
        "ckptscope_jobs_total": "background jobs finished, by kind and state",
        "ckptscope_job_duration_seconds": "duration of finished background jobs",
    }

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            summaries = {k: list(v) for k, v in self._summaries.items()}
        for name in sorted({n for n, _ in counters}):
            lines += [f"# HELP {name} {self.HELP.get(name, name)}", f"# TYPE {name} counter"]
            for (n, labels), value in sorted(counters.items()):
                if n == name:
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
        for name, (count, total) in sorted(summaries.items()):
            lines += [
                f"# HELP {name} {self.HELP.get(name, name)}",
                f"# TYPE {name} summary",
                f"{name}_count {count:g}",
                f"{name}_sum {total:.6f}",
            ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
