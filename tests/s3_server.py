"""A real S3-protocol server for the tests: moto's WSGI app on 127.0.0.1, served from a thread of
the test process, behind a tiny middleware that counts the response body bytes and the requests
per (bucket, key), so a test can check that a listing read only header ranges.

moto is the practical S3-compatible server from PyPI; the client code under test knows nothing of
it (it only sees an endpoint URL and AWS credentials), so MinIO or S3 itself would do as well.

Fixtures (registered in tests/conftest.py):

- ``s3_server`` (session): the one server; other processes (a ckptscope server subprocess, Dask
  workers) reach it over loopback with ``S3Bucket.env``.
- ``s3`` (function): a fresh bucket on it, with helpers to upload and to read the counters.
- ``s3_auth_server`` (session, started on first use): a second moto in a subprocess whose IAM
  authentication is on (moto checks keys and signatures only then, and the switch is process
  wide), with one bucket and an object, and keys of a user allowed to read it and of one who is not.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.servers import free_port

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass
class _Request:
    method: str
    bucket: str
    key: str
    range: str | None
    body_bytes: int = 0


class _Counting:
    """WSGI middleware: records each request's method, bucket, key and Range header, and the bytes
    of its response body (path-style addressing: ``/bucket/key``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[_Request] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        entry = _Request(environ.get("REQUEST_METHOD", ""), bucket, key, environ.get("HTTP_RANGE"))
        if not bucket.startswith("moto-api"):
            with self.lock:
                self.log.append(entry)
        return self._counted(self.app(environ, start_response), entry)

    def _counted(self, body: Iterable[bytes], entry: _Request) -> Iterator[bytes]:
        try:
            for chunk in body:
                with self.lock:
                    entry.body_bytes += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def entries(self, bucket: str, key: str | None = None) -> list[_Request]:
        with self.lock:
            return [e for e in self.log if e.bucket == bucket and (key is None or e.key == key)]

    def forget(self, bucket: str) -> None:
        with self.lock:
            self.log = [e for e in self.log if e.bucket != bucket]


class S3Server:
    """moto on a free loopback port, in a daemon thread of this process."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.counter = _Counting(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", free_port(), self.counter, threaded=True, request_handler=MotoRequestHandler
        )
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }
        self.boto = _boto_client(self.endpoint, ACCESS_KEY, SECRET_KEY)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


def _boto_client(endpoint: str, key: str, secret: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=REGION,
    )


@dataclass
class S3Bucket:
    """One test's bucket on the shared server."""

    server: S3Server
    bucket: str
    made: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str]:
        """The AWS_* variables a client (or a server subprocess) needs to reach this bucket."""
        return dict(self.server.env)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def put(self, key: str, data: bytes | Path | str) -> str:
        """Upload bytes or a file's contents under ``key``; returns the object's ETag (quoted)."""
        body = Path(data).read_bytes() if isinstance(data, Path | str) else data
        answer = self.server.boto.put_object(Bucket=self.bucket, Key=key, Body=body)
        return str(answer["ETag"])

    def put_tree(self, prefix: str, directory: Path) -> list[str]:
        """Upload every file under ``directory`` to ``prefix/<relative path>``; returns the keys."""
        keys = []
        for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), path.relative_to(directory).as_posix()) if part)
            self.put(key, path)
            keys.append(key)
        return keys

    def make_bucket(self, name: str | None = None) -> str:
        """Another bucket on the same server (removed with this one); returns its name."""
        name = name or f"extra-{uuid.uuid4().hex[:12]}"
        self.server.boto.create_bucket(Bucket=name)
        self.made.append(name)
        return name

    def enable_versioning(self) -> None:
        self.server.boto.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

    def requests(self, key: str | None = None) -> list[tuple[str, str, str | None]]:
        """(method, key, Range header) of every request to this bucket (or to one key) so far."""
        return [(e.method, e.key, e.range) for e in self.server.counter.entries(self.bucket, key)]

    def served_bytes(self, key: str | None = None) -> int:
        """Response body bytes the server sent for this bucket (or one key) so far."""
        return sum(e.body_bytes for e in self.server.counter.entries(self.bucket, key))

    def reset_counts(self) -> None:
        self.server.counter.forget(self.bucket)

    def cleanup(self) -> None:
        boto = self.server.boto
        for name in [self.bucket, *self.made]:
            try:
                versions = boto.list_object_versions(Bucket=name)
                for v in versions.get("Versions", []) + versions.get("DeleteMarkers", []):
                    boto.delete_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"])
                boto.delete_bucket(Bucket=name)
            except Exception:  # a test that deleted its bucket itself
                pass
            self.server.counter.forget(name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Bucket]:
    bucket = S3Bucket(s3_server, f"test-{uuid.uuid4().hex[:16]}")
    s3_server.boto.create_bucket(Bucket=bucket.bucket)
    yield bucket
    bucket.cleanup()


# --- a second server with IAM authentication on ------------------------------------------------


@dataclass
class AuthServer:
    endpoint: str
    bucket: str
    key: str
    data: bytes
    reader: tuple[str, str]  # (access key id, secret) of a user allowed to read the bucket
    stranger: tuple[str, str]  # keys of a real user with no permissions

    def env(self, access_key: str, secret: str) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": REGION,
        }


def _iam_user(iam: Any, name: str, policy: dict[str, Any] | None) -> tuple[str, str]:
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto-auth") / "moto.log").open("w")
    moto = Path(sys.executable).with_name("moto_server")
    command = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/data.json", timeout=1).close()
                break
            except (OSError, urllib.error.URLError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server with authentication did not start") from None
                time.sleep(0.1)
        boto = _boto_client(endpoint, ACCESS_KEY, SECRET_KEY)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        bucket, key, data = "guarded", "model.bin", b"guarded bytes " * 100
        boto.create_bucket(Bucket=bucket)
        boto.put_object(Bucket=bucket, Key=key, Body=data)
        reader = _iam_user(
            iam,
            "reader",
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]},
        )
        stranger = _iam_user(iam, "stranger", None)
        # from now on moto checks every request's key and signature (and the user's policies)
        urllib.request.urlopen(
            urllib.request.Request(
                endpoint + "/moto-api/reset-auth",
                data=b"0",
                method="POST",
                headers={"Content-Type": "application/octet-stream"},
            )
        ).close()
        yield AuthServer(endpoint, bucket, key, data, reader, stranger)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
