"""``python -m tests.slow_server serve ...``: ckptscope whose stats sleep CKPTSCOPE_TEST_SLOW_STATS_S
before each large tensor, so that tests can shut the server down or delete the checkpoint from
another process while a stats job is running. Nothing else differs from ``ckptscope``."""

from __future__ import annotations

import os
import sys
import time

import app.stats.engine as engine
from app.cli import main

_DELAY = float(os.environ.get("CKPTSCOPE_TEST_SLOW_STATS_S", "0.1"))
_real_tensor_stats = engine.tensor_stats


def _slow_tensor_stats(*args, **kwargs):  # type: ignore[no-untyped-def]
    time.sleep(_DELAY)
    return _real_tensor_stats(*args, **kwargs)


engine.tensor_stats = _slow_tensor_stats

if __name__ == "__main__":
    sys.exit(main())
