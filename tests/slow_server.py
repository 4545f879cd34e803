"""``python -m tests.slow_server serve ...``: ckptscope whose stats sleep CKPTSCOPE_TEST_SLOW_STATS_S
before each large tensor, so that tests can shut the server down or delete the checkpoint from
another process while a stats job is running. Nothing else differs from ``ckptscope``."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import ckptscope.jobs.runner as runner
from ckptscope.cli import main
from ckptscope.stats.engine import Engine, choose_engine

_DELAY = float(os.environ.get("CKPTSCOPE_TEST_SLOW_STATS_S", "0.1"))


def _slow_engine(device: str | None = None) -> Engine:
    real = choose_engine(device)

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(_DELAY)
        return real.per_tensor(*args, **kwargs)

    return dataclasses.replace(real, per_tensor=slow)


runner.choose_engine = _slow_engine  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main())
