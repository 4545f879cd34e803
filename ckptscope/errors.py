"""The one error hierarchy. Each error has a stable machine-readable ``code`` and an HTTP
``status``; the HTTP layer maps every one of them to problem+json (or a readable page) in one
place, and the CLI prints ``str(error)`` on one line. Readers, writers, the store and the services
raise these, never bare ``KeyError``/``ValueError`` for a user's mistake."""

from __future__ import annotations

from typing import Any, ClassVar


class CkptscopeError(Exception):
    status: ClassVar[int] = 400
    default_code: ClassVar[str] = "bad_request"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.extra: dict[str, Any] = {}  # JSON-ready members the problem document carries besides these

    def __str__(self) -> str:
        return self.detail


class CheckpointError(CkptscopeError):
    """A file that is not a readable checkpoint. ``message`` is the one-line reason; ``detail``
    says so in a sentence for an API client."""

    status = 422

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"the file is not a readable checkpoint: {message}", code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(CkptscopeError):
    status = 404
    default_code = "not_found"


class UnknownRoot(NotFound):
    """A root (key path of a tensor dict inside a nested checkpoint) that the checkpoint lacks."""

    default_code = "unknown_root"


class Invalid(CkptscopeError):
    status = 422
    default_code = "invalid"


class UnsupportedOutput(Invalid):
    """Tensors that the chosen output format cannot store (e.g. complex128 in safetensors)."""

    default_code = "unsupported_output"


class TooLarge(CkptscopeError):
    status = 413
    default_code = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes (CKPTSCOPE_MAX_UPLOAD_BYTES)")
        self.limit = limit


class Forbidden(CkptscopeError):
    """A request the server's configuration does not allow (e.g. a source outside the configured
    roots or buckets)."""

    status = 403
    default_code = "forbidden"


class SourceError(CkptscopeError):
    """A referenced checkpoint's store (a local root or an S3-compatible bucket) could not serve it."""

    status = 422
    default_code = "source_error"


class SourceNotFound(SourceError):
    status = 404
    default_code = "source_not_found"


class SourceDenied(SourceError):
    """The store refused the request: bad or missing credentials, or no permission."""

    status = 403
    default_code = "source_denied"


class SourceUnreachable(SourceError):
    """The store did not answer (connection refused, DNS, timeout)."""

    status = 502
    default_code = "source_unreachable"


class SourceChanged(SourceError):
    """The object changed (another ETag, version, size or mtime) since it was listed."""

    status = 409
    default_code = "source_changed"
