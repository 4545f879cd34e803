"""The S3 connection settings from the standard AWS environment, as plain obstore configuration.

obstore reads ``AWS_*`` environment variables itself but not the shared profile files, so the
named profile (``AWS_PROFILE``, else ``default``) is read here with configparser from
``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_CONFIG_FILE`` (default ``~/.aws/credentials`` and
``~/.aws/config``): its static keys, region and endpoint_url. Environment variables win over the
profile; credentials are taken as a unit (an environment key id never pairs with a profile secret).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Everything needed to make an S3 store in any process (picklable, no live objects)."""

    endpoint: str | None
    region: str
    access_key_id: str | None
    secret_access_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)

    @property
    def allow_http(self) -> bool:
        return bool(self.endpoint) and urlsplit(self.endpoint or "").scheme.lower() == "http"

    @property
    def endpoint_host(self) -> str:
        """The endpoint's host[:port] for messages (never credentials), or the AWS default."""
        if not self.endpoint:
            return f"s3.{self.region}.amazonaws.com"
        parts = urlsplit(self.endpoint)
        return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else self.endpoint

    def store_config(self) -> dict[str, str]:
        config: dict[str, str] = {"region": self.region}
        if self.endpoint:
            config["endpoint"] = self.endpoint
        return config

    def credentials(self) -> StaticCredentials | None:
        """The static keys as an obstore credential provider (so that obstore never pairs them
        with a session token of the process environment), or None to let obstore find them
        (instance / container / web identity credentials)."""
        if self.access_key_id and self.secret_access_key:
            return StaticCredentials(self.access_key_id, self.secret_access_key, self.session_token)
        return None


@dataclass(frozen=True, slots=True)
class StaticCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str | None = field(repr=False)

    def __call__(self) -> dict[str, Any]:
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "token": self.token,
            "expires_at": None,
        }


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return configparser.ConfigParser(interpolation=None)  # an unreadable file is as good as none
    return parser


def _section(parser: configparser.ConfigParser, names: list[str]) -> dict[str, str]:
    for name in names:
        if parser.has_section(name):
            return {k.lower(): v.strip() for k, v in parser.items(name)}
    return {}


def _profile(env: Mapping[str, str]) -> dict[str, str]:
    """The named profile's values from the credentials file, then the config file."""
    name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    credentials_file = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials").expanduser()
    config_file = Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config").expanduser()
    config = _section(_read_ini(config_file), [f"profile {name}", name] if name != "default" else ["default"])
    credentials = _section(_read_ini(credentials_file), [name])
    return {**config, **credentials}


def s3_settings(env: Mapping[str, str]) -> S3Settings:
    """The S3 settings that ``env`` (and the profile it names) gives."""
    profile = _profile(env)
    key: str | None
    secret: str | None
    token: str | None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        key, secret, token = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN")
    else:
        key = profile.get("aws_access_key_id")
        secret = profile.get("aws_secret_access_key")
        token = profile.get("aws_session_token")
    endpoint = (
        env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or env.get("AWS_ENDPOINT")
        or profile.get("endpoint_url")
        or None
    )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.get("region") or DEFAULT_REGION
    return S3Settings(endpoint, region, key or None, secret or None, token or None)
