"""Settings from the environment (prefix ``CKPTSCOPE_``), validated when they are read."""

from __future__ import annotations

import ipaddress
import json
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ckptscope.formats.sandbox import Limits
from ckptscope.insights.findings import Thresholds, load_thresholds

_DEVICE = re.compile(r"^(|host|auto|cpu|cuda(:\d+)?)$")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


def parse_allowed_hosts(value: str) -> frozenset[str] | None:
    """``CKPTSCOPE_ALLOWED_HOSTS`` as a set of lower-case host names (IPv6 without brackets, no
    trailing dot), or None for ``*`` (any host). Raises ValueError with the reason."""
    names: set[str] = set()
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if ":" in entry:
            try:
                ipaddress.IPv6Address(entry)
            except ValueError:
                raise ValueError(f"{raw.strip()!r} is not a host name (give names without a port)") from None
        elif not _HOST_NAME.match(entry) or len(entry) > 253:
            raise ValueError(f"{raw.strip()!r} is not a host name")
        names.add(entry.rstrip("."))
    if not names:
        raise ValueError("name at least one host (or * for any)")
    return frozenset(names)


_SCHEDULER = re.compile(r"^((tcp|tls|inproc|ucx)://\S+|local:[1-9]\d{0,2})$")


def valid_scheduler(value: str) -> str:
    """A Dask scheduler address (tcp://host:port, tls://..., or local:N), or ValueError."""
    if not _SCHEDULER.match(value):
        raise ValueError("must be tcp://host:port (or tls://...), or local:N for N local worker processes")
    return value


def parse_list_setting(value: str) -> list[str]:
    """A setting that takes a list: a JSON list of strings, or comma-separated (blanks dropped)."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ValueError("is not a valid JSON list") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("must be a JSON list of strings")
        return [i.strip() for i in items if i.strip()]
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CKPTSCOPE_")

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    max_upload_bytes: int = Field(50 * 1024**3, gt=0)
    api_token: str | None = None
    stats_workers: int = Field(2, ge=1)
    job_stale_s: float = Field(60.0, gt=0)  # a stats claim not renewed this long is taken over
    stats_device: str = ""  # "" = the CPU engine; "cpu", "cuda", "cuda:N" or "auto" (CUDA when present)
    parse_memory_bytes: int = Field(2 * 1024**3, gt=0)
    parse_cpu_seconds: int = Field(20, gt=0)
    parse_timeout_s: float = Field(60.0, gt=0)
    parallel_parses: int = Field(2, ge=1)  # uploads parsed at once; the others wait their turn
    max_body_bytes: int = Field(1024**2, gt=0)  # every request body but the uploads'
    allowed_hosts: str = "localhost,127.0.0.1,::1"  # Host header names served (DNS rebinding); * = any
    session_ttl_s: float = Field(12 * 3600.0, gt=0)  # browser logins (CKPTSCOPE_API_TOKEN) expire after this
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # on SIGTERM, requests still running get this long before they are cancelled (their partial
    # uploads removed); below Docker's default 10 s stop grace, so `docker stop` is never a SIGKILL
    shutdown_grace_s: int = Field(5, ge=1)
    findings_thresholds: Path | None = None  # JSON object overriding the findings' thresholds (README "Findings")
    # checkpoints registered by reference (issue 17): local folders and S3 buckets they may live in,
    # each a comma-separated list or a JSON list; empty: no references of that kind
    source_roots: str = ""
    source_buckets: str = ""
    source_recheck_s: float = Field(0.0, ge=0)  # a referenced object's identity is re-read at most this often
    dask_scheduler: str = ""  # "" (local threads), "tcp://host:port", or "local:N" (an in-process LocalCluster)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # absolute, so that every blob path means the same file to the sandboxed parser, which runs
        # in another working directory (the installed package's), and to the server
        return value.expanduser().absolute()

    @field_validator("source_roots", "source_buckets")
    @classmethod
    def _source_list(cls, value: str) -> str:
        parse_list_setting(value)
        return value

    @field_validator("dask_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return valid_scheduler(value) if value else value

    @property
    def source_root_list(self) -> list[Path]:
        """CKPTSCOPE_SOURCE_ROOTS as absolute paths (symlinks in them resolved)."""
        return [Path(r).expanduser().resolve() for r in parse_list_setting(self.source_roots)]

    @property
    def source_bucket_list(self) -> list[str]:
        return parse_list_setting(self.source_buckets)

    @field_validator("stats_device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be empty (the CPU engine), host, auto, cpu, cuda or cuda:N")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        parse_allowed_hosts(value)
        return value

    @field_validator("findings_thresholds")
    @classmethod
    def _thresholds_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_thresholds(value)  # a bad file is refused at startup, with the reason
        return value

    @property
    def findings_threshold_values(self) -> Thresholds:
        """The findings' thresholds: the defaults, overridden by CKPTSCOPE_FINDINGS_THRESHOLDS."""
        return Thresholds() if self.findings_thresholds is None else load_thresholds(self.findings_thresholds)

    @property
    def allowed_host_names(self) -> frozenset[str] | None:
        """The Host names served; None when any is (``*``)."""
        return parse_allowed_hosts(self.allowed_hosts)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'catalogue.db').resolve()}"

    @property
    def parse_limits(self) -> Limits:
        """The resource limits of the sandboxed parser."""
        return Limits(self.parse_memory_bytes, self.parse_cpu_seconds, self.parse_timeout_s)


@lru_cache
def get_settings() -> Settings:
    return Settings()
