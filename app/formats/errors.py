"""The one error type every reader raises for a file it will not or cannot read."""

from __future__ import annotations


class CheckpointError(Exception):
    """A file that is not a readable checkpoint.

    ``code`` is a stable machine-readable reason (used in API problem types and the
    regression corpus); ``str(err)`` is a one-line human explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
