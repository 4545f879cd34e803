"""obstore's and the OS's failures as our one-line source errors (never a raw message with a
Rust debug dump, never a credential)."""

from __future__ import annotations

import re

from obstore.exceptions import (
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from ckptscope.errors import SourceChanged, SourceDenied, SourceError, SourceNotFound, SourceUnreachable

from .sources_refs import SourceRef

_STATUS = re.compile(r"status code: (\d{3})")
_DENIED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken")
_UNREACHABLE = (
    "error sending request",
    "kind: Connect",
    "kind: Timeout",
    "timed out",
    "dns error",
    "Connection refused",
)
CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"


def s3_error(exc: BaseException, ref: SourceRef, endpoint_host: str) -> SourceError:
    """The source error that stands for ``exc``, raised by obstore while serving ``ref``."""
    text = str(exc)
    status = int(m.group(1)) if (m := _STATUS.search(text)) else None
    if isinstance(exc, PreconditionError) or status == 412 or "PreconditionFailed" in text:
        return SourceChanged(f"{ref.url} changed since it was listed (its ETag or version no longer matches)")
    if status == 416 or "InvalidRange" in text:
        return SourceChanged(f"{ref.url} changed since it was listed (it is shorter)")
    if "NoSuchBucket" in text:
        return SourceNotFound(f"bucket {ref.bucket!r} does not exist on {endpoint_host}")
    if isinstance(exc, FileNotFoundError | NotFoundError) or status == 404:
        return SourceNotFound(f"{ref.url} does not exist")
    denied = next((code for code in _DENIED_CODES if code in text), None)
    if denied or isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        denied = denied or "access denied"
        return SourceDenied(f"{endpoint_host} refused to serve {ref.url} ({denied}): {CREDENTIALS_HINT}")
    if any(marker in text for marker in _UNREACHABLE):
        return SourceUnreachable(f"the S3 endpoint {endpoint_host} did not answer (connection refused or timed out)")
    if status is not None:
        return SourceError(f"{endpoint_host} answered HTTP {status} for {ref.url}")
    first_line = text.splitlines()[0][:200] if text else type(exc).__name__
    return SourceError(f"{ref.url} could not be read: {first_line}")


def os_error(exc: OSError, ref: SourceRef) -> SourceError:
    """The source error that stands for ``exc``, raised while reading the local ``ref``."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return SourceNotFound(f"{ref.url} does not exist")
    if isinstance(exc, PermissionError):
        return SourceDenied(f"the server may not read {ref.url} (file permissions)")
    if isinstance(exc, IsADirectoryError):
        return SourceNotFound(f"{ref.url} is a folder, not a file")
    return SourceError(f"{ref.url} could not be read: {exc.strerror or type(exc).__name__}")
