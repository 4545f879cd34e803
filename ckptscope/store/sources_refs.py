"""Where a referenced checkpoint lives: a parsed, validated source URL (``s3://bucket/key`` or
``file:///abs/path``) and what the store says about one object (its identity)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ckptscope.errors import Invalid

SCHEMES = ("file", "s3")
MAX_KEY_BYTES = 1024  # S3's limit on an object key
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_SAFE = "/!$&'()*+,;=:@~"  # kept as they are in a canonical URL; the rest is percent-encoded


def _bad(reason: str) -> Invalid:
    return Invalid(f"not a usable source URL: {reason}", "bad_source")


def check_bucket_name(bucket: str) -> str:
    """``bucket`` if it follows S3's bucket naming rules, else Invalid (code ``bad_source``)."""
    if not _BUCKET.match(bucket):
        raise _bad(
            "a bucket name has 3-63 characters: lower-case letters, digits, dots and hyphens, "
            "beginning and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket or _IPV4.match(bucket):
        raise _bad("a bucket name has no '..', '.-' or '-.' and is not an IP address")
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3", "--x-s3")):
        raise _bad("that bucket name uses a prefix or suffix S3 reserves")
    return bucket


def _check_text(text: str, what: str) -> None:
    if _CONTROL.search(text):
        raise _bad(f"the {what} contains a NUL or control character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"the {what} is not valid UTF-8") from None


def _check_key(key: str) -> str:
    """An S3 key (or prefix, without its trailing '/'): no empty, '.' or '..' parts, bounded."""
    _check_text(key, "key")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise _bad(f"the key is longer than {MAX_KEY_BYTES} bytes")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise _bad("the key has an empty, '.' or '..' part")
    return key


def _check_path(path: str) -> str:
    """An absolute local path, normalised; '..' parts are refused rather than resolved."""
    _check_text(path, "path")
    if not path.startswith("/"):
        raise _bad("a file URL names an absolute path (file:///abs/path)")
    if ".." in path.split("/"):
        raise _bad("the path has a '..' part")
    normal = os.path.normpath(path)
    if normal.startswith("//"):  # POSIX keeps a leading '//'; it means nothing special on Linux
        normal = "/" + normal.lstrip("/")
    if len(normal.encode("utf-8")) > MAX_PATH_BYTES:
        raise _bad(f"the path is longer than {MAX_PATH_BYTES} bytes")
    return normal


def _check_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name:
        raise _bad(f"{name!r} is not a plain name inside a folder")
    _check_text(name, "name")
    return name


@dataclass(frozen=True, slots=True)
class SourceRef:
    """A validated reference. ``key`` is the object key (no leading '/'; '' for the bucket's top)
    for s3, the absolute normalised local path for file. A directory (or prefix) is a ref too."""

    scheme: str  # "file" | "s3"
    bucket: str  # "" for file
    key: str

    @property
    def url(self) -> str:
        """The canonical URL; ``parse_source_url(ref.url) == ref``."""
        if self.scheme == "file":
            return "file://" + quote(self.key, safe=_URL_SAFE)
        return f"s3://{self.bucket}/{quote(self.key, safe=_URL_SAFE)}" if self.key else f"s3://{self.bucket}"

    def child(self, name: str) -> SourceRef:
        """The plain ``name`` inside this directory / prefix (refuses '', '.', '..', '/', NUL)."""
        _check_name(name)
        if self.scheme == "file":
            return SourceRef("file", "", _check_path(os.path.join(self.key, name)))
        return SourceRef("s3", self.bucket, _check_key(f"{self.key}/{name}" if self.key else name))

    @property
    def parent(self) -> SourceRef:
        """The containing directory / prefix (the top of a bucket, or '/', is its own parent)."""
        if self.scheme == "file":
            return SourceRef("file", "", os.path.dirname(self.key))
        return SourceRef("s3", self.bucket, self.key.rpartition("/")[0])

    @property
    def name(self) -> str:
        """The last part of the path or key ('' for a bucket's top or '/')."""
        return self.key.rpartition("/")[2]

    def __str__(self) -> str:
        return self.url


def parse_source_url(url: str) -> SourceRef:
    """``s3://bucket[/key]`` or ``file:///abs/path`` (also ``file://localhost/abs/path``),
    percent-encoded or not, as a SourceRef; anything else raises Invalid (code ``bad_source``)
    with a one-line reason. A trailing '/' (a folder or prefix) is dropped from the ref."""
    if not isinstance(url, str) or not url:
        raise _bad("give a URL such as s3://bucket/key or file:///path")
    if len(url) > 3 * MAX_PATH_BYTES:
        raise _bad("the URL is too long")
    _check_text(url, "URL")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise _bad("only s3://bucket/key and file:///path URLs are accepted")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _bad("the URL cannot be parsed") from None
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise _bad("a source URL has no query or fragment (percent-encode '?' and '#' in a key)")
    netloc, raw_path = parts.netloc, parts.path
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise _bad("the URL's percent-encoding is not valid UTF-8") from None
    if scheme.lower() == "file":
        if netloc not in ("", "localhost"):
            raise _bad("a file URL names a local path (file:///path), not a host")
        return SourceRef("file", "", _check_path(path))
    bucket = check_bucket_name(netloc)
    key = path[1:] if path.startswith("/") else path
    if key.endswith("/"):
        key = key[:-1]
    return SourceRef("s3", bucket, _check_key(key))


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """What the store says about one object: enough to tell when it has changed."""

    size: int
    etag: str | None = None  # the S3 ETag as the server sends it (quotes kept)
    version: str | None = None  # the S3 version id, where the bucket is versioned
    mtime: float | None = None  # UNIX seconds (file: st_mtime_ns / 1e9; s3: Last-Modified)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag, "version": self.version, "mtime": self.mtime}

    @classmethod
    def from_json(cls, d: Any) -> ObjectIdentity:
        if not isinstance(d, dict):
            raise Invalid("an object identity is a JSON object", "bad_identity")
        size, etag, version, mtime = d.get("size"), d.get("etag"), d.get("version"), d.get("mtime")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Invalid("an object identity has a non-negative integer size", "bad_identity")
        if not all(v is None or isinstance(v, str) for v in (etag, version)):
            raise Invalid("an object identity's etag and version are strings or null", "bad_identity")
        if mtime is not None and (isinstance(mtime, bool) or not isinstance(mtime, int | float)):
            raise Invalid("an object identity's mtime is a number or null", "bad_identity")
        return cls(size, etag, version, None if mtime is None else float(mtime))

    def same_object(self, other: ObjectIdentity) -> bool:
        """Same version id when both have one, else same ETag when both have one, else the same
        size and (when both know it) mtime. A size difference always means another object."""
        if self.size != other.size:
            return False
        if self.version and other.version:
            return self.version == other.version
        if self.etag and other.etag:
            return self.etag == other.etag
        return self.mtime is None or other.mtime is None or self.mtime == other.mtime
