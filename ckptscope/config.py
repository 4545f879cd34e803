"""Settings from the environment (prefix ``CKPTSCOPE_``), validated when they are read."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ckptscope.formats.sandbox import Limits

_DEVICE = re.compile(r"^(|host|auto|cpu|cuda(:\d+)?)$")


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
    parse_cpu_seconds: int = Field(60, gt=0)
    parse_timeout_s: float = Field(120.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("stats_device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be empty (the CPU engine), host, auto, cpu, cuda or cuda:N")
        return value

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
