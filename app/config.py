"""Settings from the environment (prefix ``CKPTSCOPE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CKPTSCOPE_")

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    max_upload_bytes: int = 50 * 1024**3
    api_token: str | None = None
    stats_workers: int = 2
    job_stale_s: float = 60.0  # a stats claim not renewed this long is taken over by another process
    stats_device: str = ""  # "" = the CPU kernel; "cuda", "cuda:N" or "auto" (CUDA when present)
    parse_memory_bytes: int = 2 * 1024**3
    parse_cpu_seconds: int = 60
    parse_timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'catalogue.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
