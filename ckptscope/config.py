"""Settings from the environment (prefix ``CKPTSCOPE_``), validated when they are read.

Each setting is defined once, in ``SettingsFields``: ``CKPTSCOPE_`` + its name in upper case, its
type, bounds and default (and its check in ``_CHECKS``). ``Settings``, the validated settings the
server runs on, is the pydantic-settings model of those fields, built on first use: pydantic and
pydantic-settings take ~0.15 s to import, which a command line run that sets none of them does not
pay (``command_settings``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

if TYPE_CHECKING:  # Field: read from the fields' annotations when the model is built (``_settings_model``)
    from pydantic import Field
    from pydantic_settings import BaseSettings

    from ckptscope.formats.sandbox import Limits
    from ckptscope.insights.findings import Thresholds

ENV_PREFIX = "CKPTSCOPE_"
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


class SettingsFields:
    """The settings, each defined once (``Settings``' fields, read by pydantic from this base), with
    what is derived from them. An instance of this class alone holds the defaults
    (``command_settings``)."""

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    max_upload_bytes: Annotated[int, Field(gt=0)] = 50 * 1024**3
    api_token: str | None = None
    stats_workers: Annotated[int, Field(ge=1)] = 2
    job_stale_s: Annotated[float, Field(gt=0)] = 60.0  # a stats claim not renewed this long is taken over
    stats_device: str = ""  # "" = the CPU engine; "cpu", "cuda", "cuda:N" or "auto" (CUDA when present)
    parse_memory_bytes: Annotated[int, Field(gt=0)] = 2 * 1024**3
    parse_cpu_seconds: Annotated[int, Field(gt=0)] = 20
    parse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    parallel_parses: Annotated[int, Field(ge=1)] = 2  # uploads parsed at once; the others wait their turn
    max_body_bytes: Annotated[int, Field(gt=0)] = 1024**2  # every request body but the uploads'
    allowed_hosts: str = "localhost,127.0.0.1,::1"  # Host header names served (DNS rebinding); * = any
    # browser logins (CKPTSCOPE_API_TOKEN) expire after this
    session_ttl_s: Annotated[float, Field(gt=0)] = 12 * 3600.0
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # on SIGTERM, requests still running get this long before they are cancelled (their partial
    # uploads removed); below Docker's default 10 s stop grace, so `docker stop` is never a SIGKILL
    shutdown_grace_s: Annotated[int, Field(ge=1)] = 5
    findings_thresholds: Path | None = None  # JSON object overriding the findings' thresholds (README "Findings")
    # checkpoints registered by reference (issue 17): local folders and S3 buckets they may live in,
    # each a comma-separated list or a JSON list; empty: no references of that kind
    source_roots: str = ""
    source_buckets: str = ""
    # a referenced object's identity is re-read at most this often
    source_recheck_s: Annotated[float, Field(ge=0)] = 0.0
    dask_scheduler: str = ""  # "" (local threads), "tcp://host:port", or "local:N" (an in-process LocalCluster)

    @property
    def source_root_list(self) -> list[Path]:
        """CKPTSCOPE_SOURCE_ROOTS as absolute paths (symlinks in them resolved)."""
        return [Path(r).expanduser().resolve() for r in parse_list_setting(self.source_roots)]

    @property
    def source_bucket_list(self) -> list[str]:
        return parse_list_setting(self.source_buckets)

    @property
    def findings_threshold_values(self) -> Thresholds:
        """The findings' thresholds: the defaults, overridden by CKPTSCOPE_FINDINGS_THRESHOLDS."""
        from ckptscope.insights.findings import Thresholds, load_thresholds

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
        from ckptscope.formats.sandbox import Limits

        return Limits(self.parse_memory_bytes, self.parse_cpu_seconds, self.parse_timeout_s)


def _absolute_data_dir(value: Path) -> Path:
    # absolute, so that every blob path means the same file to the sandboxed parser, which runs
    # in another working directory (the installed package's), and to the server
    return value.expanduser().absolute()


def _source_list(value: str) -> str:
    parse_list_setting(value)
    return value


def _scheduler(value: str) -> str:
    return valid_scheduler(value) if value else value


def _known_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError("must be empty (the CPU engine), host, auto, cpu, cuda or cuda:N")
    return value


def _host_names(value: str) -> str:
    parse_allowed_hosts(value)
    return value


def _thresholds_file(value: Path | None) -> Path | None:
    if value is not None:
        from ckptscope.insights.findings import load_thresholds

        load_thresholds(value)  # a bad file is refused at startup, with the reason
    return value


# each field's check, run on its (typed) value, the default included; a ValueError is the field's error
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "data_dir": _absolute_data_dir,
    "source_roots": _source_list,
    "source_buckets": _source_list,
    "dask_scheduler": _scheduler,
    "stats_device": _known_device,
    "allowed_hosts": _host_names,
    "findings_thresholds": _thresholds_file,
}

if TYPE_CHECKING:

    class Settings(BaseSettings, SettingsFields):
        """The settings from the environment, validated (``_settings_model`` builds it)."""


@cache
def _settings_model() -> type[Settings]:
    """The pydantic-settings model of ``SettingsFields`` with ``_CHECKS`` as its field validators."""
    from pydantic import Field, field_validator  # noqa: F401  (Field: the annotations' bounds resolve here)
    from pydantic_settings import BaseSettings, SettingsConfigDict

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": "Settings",
        "model_config": SettingsConfigDict(env_prefix=ENV_PREFIX),
    }
    for name, check in _CHECKS.items():
        namespace[f"_check_{name}"] = field_validator(name)(staticmethod(check))
    # the fields' annotations are strings (``from __future__ import annotations``): pydantic
    # resolves them in this module and in this function's namespace, where Field is imported
    model_class: Any = type(BaseSettings)  # pydantic's model metaclass
    model = model_class("Settings", (BaseSettings, SettingsFields), namespace)
    globals()["Settings"] = model  # a name of this module from now on, as a class statement makes it
    return cast("type[Settings]", model)


def __getattr__(name: str) -> Any:
    if name == "Settings":
        return _settings_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def command_settings() -> SettingsFields:
    """The settings as a command reads them: ``Settings()`` where the environment names any of
    them (validated, its errors the server's), else their defaults (checked as ``Settings``
    checks them) without importing pydantic."""
    names = {f"{ENV_PREFIX}{name}".lower() for name in SettingsFields.__annotations__}
    if any(key.lower() in names for key in os.environ):
        return _settings_model()()
    defaults = SettingsFields()
    for name, check in _CHECKS.items():
        setattr(defaults, name, check(getattr(SettingsFields, name)))
    return defaults


@lru_cache
def get_settings() -> Settings:
    return _settings_model()()
