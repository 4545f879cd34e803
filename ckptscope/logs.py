"""Structured logs: one JSON object per line on stderr, ours and uvicorn's alike.

``configure()`` sets up the ``ckptscope`` loggers, turns Python warnings into log records, and
gives uvicorn's loggers the same format (whoever configured them: ``ckptscope serve`` passes
``UVICORN_LOG_CONFIG``; a plain ``uvicorn --factory ckptscope.main:create_app`` start has its
handlers re-formatted when the app is created). uvicorn's access log is redundant with ours
(``ckptscope.access``, with the request id) and ``serve`` keeps it off.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# logging.config.dictConfig for uvicorn.run(log_config=...): its loggers in our JSON, on stderr
UVICORN_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "ckptscope.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},  # propagates to "uvicorn"
        "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


def _json_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure() -> None:
    logger = logging.getLogger("ckptscope")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        logger.addHandler(_json_handler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    warnings_logger = logging.getLogger("py.warnings")  # e.g. a library's warning at import
    if not any(isinstance(h.formatter, JsonFormatter) for h in warnings_logger.handlers):
        warnings_logger.addHandler(_json_handler())
        warnings_logger.propagate = False
    logging.captureWarnings(True)
    for name in UVICORN_LOGGERS:  # uvicorn configured its own (coloured text) handlers: reformat them
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
