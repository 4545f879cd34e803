"""Sources (issue 17): source URLs, the roots/buckets policy, and the client that reads both kinds
of store, against real temp folders and a real S3-protocol server (moto, tests/s3_server.py)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.config import Settings
from ckptscope.errors import (
    CheckpointError,
    Forbidden,
    Invalid,
    SourceChanged,
    SourceDenied,
    SourceNotFound,
    SourceUnreachable,
)
from ckptscope.store import sources_local
from ckptscope.store.sources import (
    ObjectIdentity,
    SourceClient,
    SourcePolicy,
    SourceRef,
    parse_source_url,
    s3_settings,
)
from tests.factories import sharded_safetensors
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _safetensors(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_file({"embed.weight": torch.randn(64, 32), "head.bias": torch.arange(10, dtype=torch.float32)}, path)
    return path


def _header(client: SourceClient, ref: SourceRef, identity: ObjectIdentity | None = None) -> tuple[int, dict]:
    (first,) = client.read_ranges(ref, [(0, 8)], identity)
    (n,) = struct.unpack("<Q", first)
    (raw,) = client.read_ranges(ref, [(8, 8 + n)], identity)
    return 8 + n, json.loads(raw)


# --- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "key"),
    [
        ("s3://my-bucket/run7/model.safetensors", "s3", "my-bucket", "run7/model.safetensors"),
        ("s3://my-bucket", "s3", "my-bucket", ""),
        ("s3://my-bucket/", "s3", "my-bucket", ""),
        ("s3://my-bucket/run7/", "s3", "my-bucket", "run7"),
        ("S3://my.bucket.01/a%20b%25c.bin", "s3", "my.bucket.01", "a b%c.bin"),
        ("s3://my-bucket/caf%C3%A9/x", "s3", "my-bucket", "café/x"),
        ("file:///mnt/x/model.safetensors", "file", "", "/mnt/x/model.safetensors"),
        ("file://localhost/mnt/x/", "file", "", "/mnt/x"),
        ("file:///mnt//x/./y%20z", "file", "", "/mnt/x/y z"),
    ],
)
def test_source_urls_parse_to_canonical_refs(url, scheme, bucket, key):
    ref = parse_source_url(url)
    assert (ref.scheme, ref.bucket, ref.key) == (scheme, bucket, key)
    assert parse_source_url(ref.url) == ref  # the canonical URL means the same object


def test_canonical_urls_percent_encode_only_what_needs_it():
    assert parse_source_url("s3://b-1/a%20b%25c%3F%23.bin").url == "s3://b-1/a%20b%25c%3F%23.bin"
    assert parse_source_url("s3://b-1/dir/x.pt").url == "s3://b-1/dir/x.pt"
    assert parse_source_url("file://localhost/mnt/a/").url == "file:///mnt/a"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "give a URL"),
        ("http://example.com/x", "only s3://"),
        ("/mnt/x/model.pt", "only s3://"),
        ("s3:/bucket/key", "only s3://"),
        ("gs://bucket/key", "only s3://"),
        ("s3://Bad_Bucket/k", "bucket name"),
        ("s3://ab/k", "bucket name"),
        ("s3://-bucket/k", "bucket name"),
        ("s3://buck..et/k", "'..'"),
        ("s3://192.168.1.1/k", "IP address"),
        ("s3://user@bucket/k", "bucket name"),
        ("s3://bucket:9000/k", "bucket name"),
        ("s3://xn--bucket/k", "reserves"),
        ("s3://bucket/a/../b", "'..' part"),
        ("s3://bucket/a/%2E%2E/b", "'..' part"),
        ("s3://bucket/a//b", "empty"),
        ("s3://bucket/a%00b", "NUL"),
        ("s3://bucket/a\nb", "control"),
        ("s3://bucket/k?versionId=3", "query"),
        ("s3://bucket/k#frag", "fragment"),
        ("s3://bucket/" + "k" * 1025, "1024 bytes"),
        ("s3://bucket/%FF", "UTF-8"),
        ("file:///mnt/x/../../etc/passwd", "'..' part"),
        ("file:///mnt/%2e%2e/etc", "'..' part"),
        ("file://otherhost/mnt/x", "not a host"),
        ("file:relative/path", "only s3://"),
        ("file:///mnt/a%00b", "NUL"),
    ],
)
def test_bad_source_urls_are_refused_with_a_one_line_reason(url, fragment):
    with pytest.raises(Invalid) as caught:
        parse_source_url(url)
    assert caught.value.code == "bad_source"
    assert caught.value.status == 422
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_child_parent_and_name():
    ref = parse_source_url("s3://bucket-a/run7")
    shard = ref.child("model-00001.safetensors")
    assert shard.url == "s3://bucket-a/run7/model-00001.safetensors"
    assert shard.name == "model-00001.safetensors"
    assert shard.parent == ref
    assert parse_source_url("s3://bucket-a").child("x").key == "x"
    assert parse_source_url("s3://bucket-a/x").parent == parse_source_url("s3://bucket-a")
    local = parse_source_url("file:///mnt/run7")
    assert local.child("a b.pt").key == "/mnt/run7/a b.pt"
    assert local.child("a b.pt").parent == local
    assert local.name == "run7"
    for bad in ("", ".", "..", "a/b", "/etc", "a\x00b", "a\nb"):
        with pytest.raises(Invalid):
            ref.child(bad)
        with pytest.raises(Invalid):
            local.child(bad)


def test_object_identity_round_trips_and_compares():
    a = ObjectIdentity(10, '"abc"', None, 1700000000.5)
    assert ObjectIdentity.from_json(json.loads(json.dumps(a.to_json()))) == a
    assert a.same_object(ObjectIdentity(10, '"abc"', None, 1800000000.0))  # same ETag: mtime is no matter
    assert not a.same_object(ObjectIdentity(10, '"abd"', None, 1700000000.5))
    assert not a.same_object(ObjectIdentity(11, '"abc"'))
    assert ObjectIdentity(5, None, "v1").same_object(ObjectIdentity(5, '"x"', "v1"))
    assert not ObjectIdentity(5, '"x"', "v1").same_object(ObjectIdentity(5, '"x"', "v2"))
    assert ObjectIdentity(5, mtime=1.5).same_object(ObjectIdentity(5, mtime=1.5))
    assert not ObjectIdentity(5, mtime=1.5).same_object(ObjectIdentity(5, mtime=2.5))
    for bad in ({"size": -1}, {"size": "3"}, {"size": 3, "etag": 4}, {"size": 3, "mtime": "x"}, [], {"size": True}):
        with pytest.raises(Invalid):
            ObjectIdentity.from_json(bad)


# --- the policy -------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "root"
    (folder / "run7").mkdir(parents=True)
    _safetensors(folder / "run7" / "model.safetensors")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.safetensors").write_bytes(b"secret")
    return folder


def _refused(policy: SourcePolicy, url: str) -> Forbidden:
    with pytest.raises(Forbidden) as caught:
        policy.check(url)
    assert caught.value.code == "source_not_allowed"
    assert caught.value.status == 403
    return caught.value


def test_files_inside_the_roots_are_allowed_and_outside_refused(root, tmp_path):
    policy = SourcePolicy([root], [])
    inside = root / "run7" / "model.safetensors"
    assert policy.check(f"file://{inside}") == SourceRef("file", "", str(inside))
    assert policy.check(f"file://{root}").key == str(root)
    error = _refused(policy, f"file://{tmp_path}/outside/secret.safetensors")
    assert "CKPTSCOPE_SOURCE_ROOTS" in str(error)
    assert str(tmp_path) not in str(error)  # never lists the configured roots (nor echoes the path)
    _refused(policy, f"file://{tmp_path}/root-sibling/x")  # a shared name prefix is not "inside"
    _refused(policy, "file:///etc/passwd")


def test_a_symlink_out_of_a_root_is_refused_and_one_inside_allowed(root, tmp_path):
    (root / "escape.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
    (root / "escape-dir").symlink_to(tmp_path / "outside")
    (root / "alias.safetensors").symlink_to(root / "run7" / "model.safetensors")
    (root / "alias-dir").symlink_to(root / "run7")
    policy = SourcePolicy([root], [])
    for url in (f"file://{root}/escape.safetensors", f"file://{root}/escape-dir/secret.safetensors"):
        error = _refused(policy, url)
        assert "symbolic link" in str(error)
        assert str(tmp_path) not in str(error)  # neither the path nor where the link leads is told
    want = str(root / "run7" / "model.safetensors")
    assert policy.check(f"file://{root}/alias.safetensors").key == want  # the ref carries the resolved path
    assert policy.check(f"file://{root}/alias-dir/model.safetensors").key == want


def test_a_root_given_through_a_symlink_accepts_both_spellings(root, tmp_path):
    (tmp_path / "mnt").symlink_to(root)
    policy = SourcePolicy([tmp_path / "mnt"], [])
    want = str(root / "run7" / "model.safetensors")
    assert policy.check(f"file://{tmp_path}/mnt/run7/model.safetensors").key == want
    assert policy.check(f"file://{want}").key == want


def test_confine_rechecks_a_derived_ref(root, tmp_path):
    policy = SourcePolicy([root], ["models"])
    index = policy.check(f"file://{root}/run7/model.safetensors")
    (root / "run7" / "shard.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
    with pytest.raises(Forbidden):
        policy.confine(index.parent.child("shard.safetensors"))
    with pytest.raises(Forbidden):
        policy.confine(parse_source_url("s3://other/x"))
    assert policy.confine(parse_source_url("s3://models/x")).key == "x"


def test_buckets_come_only_from_the_allowlist():
    policy = SourcePolicy([], ["models", "team-ckpts/shared/"])
    assert policy.check("s3://models/a/b.safetensors") == SourceRef("s3", "models", "a/b.safetensors")
    assert policy.check("s3://team-ckpts/shared/run1/x.pt").key == "shared/run1/x.pt"
    assert "CKPTSCOPE_SOURCE_BUCKETS" in str(_refused(policy, "s3://other-bucket/x"))
    error = _refused(policy, "s3://team-ckpts/private/x.pt")  # only under the allowed prefix
    assert "shared" not in str(error)
    _refused(policy, "s3://team-ckpts/sharedx/x.pt")
    assert "S3 sources are not enabled" in str(_refused(SourcePolicy([Path("/tmp")], []), "s3://models/x"))
    assert "local file sources are not enabled" in str(_refused(policy, "file:///tmp/x"))
    with pytest.raises(Invalid):
        policy.check("s3://Models/x")


@pytest.mark.parametrize("style", ["json", "comma"])
def test_the_policy_from_settings_in_both_list_spellings(root, tmp_path, style):
    other = tmp_path / "other root"
    other.mkdir()
    roots, buckets = [str(root), str(other)], ["models", "more-models"]
    if style == "json":
        settings = Settings(source_roots=json.dumps(roots), source_buckets=json.dumps(buckets))
    else:
        settings = Settings(source_roots=",".join(roots), source_buckets=" models , more-models ")
    policy = SourcePolicy(settings.source_root_list, settings.source_bucket_list)
    assert policy.check(f"file://{other}/x.pt").key == f"{other}/x.pt"
    assert policy.check(f"file://{root}/run7").key == f"{root}/run7"
    assert policy.check("s3://more-models/k").bucket == "more-models"
    _refused(policy, f"file://{tmp_path}/outside/secret.safetensors")
    _refused(policy, "s3://models2/k")


# --- the client on both schemes ---------------------------------------------------------------


class Place:
    """A folder of a local root or a prefix of the test bucket, holding files put there."""

    def __init__(self, kind: str, tmp_path: Path, s3) -> None:
        self.kind, self.s3 = kind, s3
        self.folder = tmp_path / "place"
        self.folder.mkdir()
        self.client = SourceClient(env=s3.env, timeout_s=10)

    def put(self, name: str, data: bytes | Path) -> SourceRef:
        body = data.read_bytes() if isinstance(data, Path) else data
        if self.kind == "file":
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(body)
        else:
            self.s3.put(f"place/{name}", body)
        return self.ref(name)

    def ref(self, name: str = "") -> SourceRef:
        if self.kind == "file":
            return parse_source_url(f"file://{self.folder}/{name}")
        return parse_source_url(self.s3.url(f"place/{name}"))


@pytest.fixture(params=["file", "s3"])
def place(request, tmp_path, s3) -> Place:
    return Place(request.param, tmp_path, s3)


def test_head_and_ranges_of_a_real_safetensors_file(place, tmp_path):
    local = _safetensors(tmp_path / "model.safetensors")
    data = local.read_bytes()
    ref = place.put("model.safetensors", local)
    identity = place.client.head(ref)
    assert identity.size == len(data)
    assert identity.mtime is not None and abs(identity.mtime - time.time()) < 120
    if place.kind == "s3":
        assert identity.etag and identity.etag.startswith('"')
    end, header = _header(place.client, ref, identity)
    start, stop = header["head.bias"]["data_offsets"]
    (raw,) = place.client.read_ranges(ref, [(end + start, end + stop)], identity)
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() == list(range(10))
    # several ranges at once, in the order asked, clamped to the object
    got = place.client.read_ranges(ref, [(len(data) - 4, len(data) + 100), (0, 8), (5, 5), (len(data) + 9, 10**12)])
    assert got == [data[-4:], data[:8], b"", b""]
    assert place.client.local_path(ref) == (ref.key if place.kind == "file" else None)


def test_copy_range_streams_a_tensor_in_pieces(place, tmp_path):
    local = _safetensors(tmp_path / "model.safetensors")
    data = local.read_bytes()
    ref = place.put("model.safetensors", local)
    end, header = _header(place.client, ref)
    start, stop = header["embed.weight"]["data_offsets"]
    out = io.BytesIO()
    assert place.client.copy_range(ref, end + start, end + stop, out, chunk=1000) == stop - start
    assert out.getvalue() == data[end + start : end + stop]
    assert torch.equal(torch.frombuffer(bytearray(out.getvalue()), dtype=torch.float32).view(64, 32), _weights())
    out = io.BytesIO()
    assert place.client.copy_range(ref, len(data) - 10, len(data) + 10**9, out) == 10  # clamped
    assert out.getvalue() == data[-10:]


def _weights() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(64, 32)


def test_list_dir_gives_one_level_of_files(place):
    place.put("model-00001-of-00002.safetensors", b"a" * 10)
    place.put("model-00002-of-00002.safetensors", b"b" * 20)
    place.put("sub/inner.bin", b"c")
    listing = place.client.list_dir(place.ref())
    assert sorted(listing) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert listing["model-00002-of-00002.safetensors"].size == 20
    assert listing["model-00002-of-00002.safetensors"].same_object(
        place.client.head(place.ref("model-00002-of-00002.safetensors"))
    )
    assert place.client.list_dir(place.ref("model-00001-of-00002.safetensors")) is None  # a file is no folder
    assert place.client.list_dir(place.ref("sub")) == {"inner.bin": place.client.head(place.ref("sub/inner.bin"))}


def test_list_dir_refuses_too_many_entries(place, monkeypatch):
    monkeypatch.setattr(sources_local, "MAX_DIR_ENTRIES", 3)
    for i in range(4):
        place.put(f"f{i}", b"x")
    with pytest.raises(CheckpointError) as caught:
        place.client.list_dir(place.ref())
    assert caught.value.code == "limit_exceeded"


def test_local_listing_leaves_out_links_that_lead_out(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "real.safetensors").write_bytes(b"r" * 7)
    (tmp_path / "secret").write_bytes(b"s" * 99)
    (folder / "alias.safetensors").symlink_to(folder / "real.safetensors")
    (folder / "escape.safetensors").symlink_to(tmp_path / "secret")
    (folder / "dangling").symlink_to(folder / "nothing")
    (folder / "bad\nname").write_bytes(b"")
    listing = SourceClient(env={}).list_dir(parse_source_url(f"file://{folder}"))
    assert sorted(listing) == ["alias.safetensors", "real.safetensors"]
    assert listing["alias.safetensors"] == listing["real.safetensors"]  # the target's file


def test_missing_objects_and_folders_are_not_found(place, s3):
    for call in (
        lambda: place.client.head(place.ref("absent.safetensors")),
        lambda: place.client.read_ranges(place.ref("absent.safetensors"), [(0, 8)]),
        lambda: place.client.copy_range(place.ref("absent.safetensors"), 0, 8, io.BytesIO()),
    ):
        with pytest.raises(SourceNotFound) as caught:
            call()
        assert caught.value.status == 404
        assert "absent.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    if place.kind == "file":
        with pytest.raises(SourceNotFound):
            place.client.list_dir(place.ref("no-such-folder"))
    else:
        assert place.client.list_dir(place.ref("no-such-prefix")) is None
        assert place.client.list_dir(parse_source_url(s3.url())) == {}  # the bucket's top: only the prefix
        with pytest.raises(SourceNotFound) as caught:
            place.client.head(parse_source_url("s3://no-such-bucket-here/x"))
        with pytest.raises(SourceNotFound, match="bucket 'no-such-bucket-here' does not exist"):
            place.client.list_dir(parse_source_url("s3://no-such-bucket-here"))


# --- changes are detected ---------------------------------------------------------------------


def test_an_overwritten_object_is_detected(s3, tmp_path):
    client = SourceClient(env=s3.env)
    ref = parse_source_url(s3.url("model.safetensors"))
    s3.put(ref.key, _safetensors(tmp_path / "a.safetensors", seed=0))
    identity = client.head(ref)
    assert client.read_ranges(ref, [(0, 8)], identity)
    s3.put(ref.key, _safetensors(tmp_path / "b.safetensors", seed=1))  # same size, other bytes
    assert client.head(ref).size == identity.size and not client.head(ref).same_object(identity)
    s3.reset_counts()
    with pytest.raises(SourceChanged) as caught:
        client.read_ranges(ref, [(0, 8), (4000, 4100)], identity)
    assert caught.value.status == 409
    assert all(method == "GET" for method, _, _ in s3.requests(ref.key))
    with pytest.raises(SourceChanged):
        client.copy_range(ref, 0, 5000, io.BytesIO(), identity, chunk=1024)


def test_a_versioned_object_is_read_at_its_listed_version(s3):
    s3.enable_versioning()
    client = SourceClient(env=s3.env)
    ref = parse_source_url(s3.url("m.bin"))
    s3.put(ref.key, b"first version")
    identity = client.head(ref)
    assert identity.version
    s3.put(ref.key, b"second version!")
    now = client.head(ref)
    assert now.version != identity.version and not now.same_object(identity)
    assert client.read_ranges(ref, [(0, 5)], identity) == [b"first"]  # pinned: never a mix of both
    assert client.read_ranges(ref, [(0, 6)], now) == [b"second"]


def test_a_rewritten_or_touched_file_is_detected(tmp_path):
    client = SourceClient(env={})
    path = _safetensors(tmp_path / "m.safetensors")
    ref = parse_source_url(f"file://{path}")
    identity = client.head(ref)
    assert client.read_ranges(ref, [(0, 8)], identity)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    with pytest.raises(SourceChanged):
        client.read_ranges(ref, [(0, 8)], identity)
    with pytest.raises(SourceChanged):
        client.copy_range(ref, 0, 8, io.BytesIO(), identity)
    identity = client.head(ref)
    _safetensors(path, seed=3)  # rewritten in place, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    with pytest.raises(SourceChanged):
        client.read_ranges(ref, [(0, 8)], identity)
    path.write_bytes(b"short")
    with pytest.raises(SourceChanged):
        client.read_ranges(ref, [(0, 8)], identity)


# --- failures of the store --------------------------------------------------------------------


def test_a_dead_endpoint_fails_fast_as_unreachable(tmp_path):
    port = free_port()  # nobody listens there
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "super-secret-value",
    }
    client = SourceClient(env=env)
    ref = parse_source_url("s3://models/x.safetensors")
    for call in (lambda: client.head(ref), lambda: client.read_ranges(ref, [(0, 8)]), lambda: client.list_dir(ref)):
        began = time.monotonic()
        with pytest.raises(SourceUnreachable) as caught:
            call()
        assert time.monotonic() - began < 5
        assert caught.value.status == 502
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "super-secret-value" not in str(caught.value) and "AKIDEXAMPLE" not in str(caught.value)


def test_bad_credentials_are_denied(s3_auth_server):
    server = s3_auth_server
    ref = parse_source_url(f"s3://{server.bucket}/{server.key}")
    good = SourceClient(env=server.env(*server.reader))
    assert good.read_ranges(ref, [(0, 7)]) == [server.data[:7]]  # the positive control: auth is on and works
    cases = {
        "InvalidAccessKeyId": server.env("AKIANOSUCHKEY0000000", "whatever"),
        "SignatureDoesNotMatch": server.env(server.reader[0], "not-the-secret"),
        "AccessDenied": server.env(*server.stranger),
    }
    for code, env in cases.items():
        client = SourceClient(env=env)
        # a HEAD answer has no body, so only a GET can tell which of the three it was
        for call, told in (
            (lambda c=client: c.head(ref), "access denied"),
            (lambda c=client: c.read_ranges(ref, [(0, 8)], good.head(ref)), code),
        ):
            with pytest.raises(SourceDenied) as caught:
                call()
            assert caught.value.status == 403
            message = str(caught.value)
            assert told in message and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile" in message
            assert env["AWS_SECRET_ACCESS_KEY"] not in message and "\n" not in message


def test_keys_region_and_endpoint_from_a_profile(s3_auth_server, tmp_path):
    server = s3_auth_server
    credentials, config = tmp_path / "credentials", tmp_path / "config"
    credentials.write_text(
        f"[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n"
        f"[team]\naws_access_key_id = {server.reader[0]}\naws_secret_access_key = {server.reader[1]}\n"
    )
    config.write_text(f"[profile team]\nregion = eu-west-3\nendpoint_url = {server.endpoint}\n")
    env = {"AWS_PROFILE": "team", "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(config)}
    settings = s3_settings(env)
    assert (settings.access_key_id, settings.region, settings.endpoint) == (
        server.reader[0],
        "eu-west-3",
        server.endpoint,
    )
    ref = parse_source_url(f"s3://{server.bucket}/{server.key}")
    assert SourceClient(env=env).read_ranges(ref, [(0, 7)]) == [server.data[:7]]
    # the environment wins over the profile
    with pytest.raises(SourceDenied):
        SourceClient(env={**env, "AWS_ACCESS_KEY_ID": "AKIAOTHER", "AWS_SECRET_ACCESS_KEY": "x"}).head(ref)
    assert s3_settings({**env, "AWS_REGION": "us-west-2"}).region == "us-west-2"
    assert s3_settings({"HOME": str(tmp_path / "nobody")}).region == "us-east-1"
    assert s3_settings({"HOME": str(tmp_path / "nobody")}).access_key_id is None


# --- pickling, threads and counted bytes ------------------------------------------------------


def test_a_pickled_client_works_in_another_process(s3, tmp_path):
    data = _safetensors(tmp_path / "m.safetensors").read_bytes()
    ref = parse_source_url(s3.url("m.safetensors"))
    s3.put(ref.key, data)
    client = SourceClient(env=s3.env)
    client.head(ref)  # a store exists now; it must not travel
    copy = pickle.loads(pickle.dumps(client))
    assert copy.read_ranges(ref, [(0, 8)]) == [data[:8]]
    assert copy.s3_settings == client.s3_settings
    code = (
        "import pickle, sys; from ckptscope.store.sources import parse_source_url; "
        "c = pickle.load(sys.stdin.buffer); "
        f"sys.stdout.buffer.write(c.read_ranges(parse_source_url({ref.url!r}), [(8, 40)])[0])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only the pickle knows the server
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(client), capture_output=True, cwd=ROOT, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == data[8:40]


def test_served_bytes_count_only_the_ranges_asked_for(s3):
    data = os.urandom(8 << 20)
    ref = parse_source_url(s3.url("big.bin"))
    s3.put(ref.key, data)
    client = SourceClient(env=s3.env, coalesce_bytes=64 << 10)
    identity = client.head(ref)
    s3.reset_counts()
    ranges = [(0, 8), (1 << 20, (1 << 20) + 5000), (5 << 20, (5 << 20) + 100), ((6 << 20) + 200, (6 << 20) + 300)]
    got = client.read_ranges(ref, ranges, identity)
    assert got == [data[s:e] for s, e in ranges]
    asked = sum(e - s for s, e in ranges)
    assert s3.served_bytes(ref.key) == asked == client.served_bytes()
    assert sorted(r for _, _, r in s3.requests(ref.key)) == sorted(f"bytes={s}-{e - 1}" for s, e in ranges)
    assert all(req[0] == "GET" for req in s3.requests(ref.key))
    # near ranges are fetched as one request (and the gap between them is counted)
    s3.reset_counts()
    client.read_ranges(ref, [(100, 200), (300, 400)], identity)
    assert s3.requests(ref.key) == [("GET", ref.key, "bytes=100-399")]
    assert s3.served_bytes(ref.key) == 300


def test_copy_range_requests_one_piece_at_a_time(s3):
    data = os.urandom(100_000)
    ref = parse_source_url(s3.url("x.bin"))
    s3.put(ref.key, data)
    client = SourceClient(env=s3.env)
    identity = client.head(ref)
    s3.reset_counts()
    out = io.BytesIO()
    assert client.copy_range(ref, 1000, 61_000, out, identity, chunk=25_000) == 60_000
    assert out.getvalue() == data[1000:61_000]
    assert sorted(r for _, _, r in s3.requests(ref.key)) == [
        "bytes=1000-25999",
        "bytes=26000-50999",
        "bytes=51000-60999",
    ]
    assert s3.served_bytes(ref.key) == 60_000


def test_one_client_serves_many_threads(place):
    data = os.urandom(300_000)
    ref = place.put("x.bin", data)
    identity = place.client.head(ref)
    spans = [(i * 997 % 290_000, i * 997 % 290_000 + 5000) for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda span: place.client.read_ranges(ref, [span], identity)[0], spans))
    assert results == [data[s:e] for s, e in spans]


def test_given_keys_never_pair_with_the_process_environment(s3_auth_server, monkeypatch):
    server = s3_auth_server
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-stale-token-of-this-process")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPROCESS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "process-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    ref = parse_source_url(f"s3://{server.bucket}/{server.key}")
    assert SourceClient(env=server.env(*server.reader)).read_ranges(ref, [(0, 7)]) == [server.data[:7]]
    with pytest.raises(SourceDenied):  # the process's own (bogus) keys and token, used together
        SourceClient().head(ref)
    assert server.reader[1] not in repr(SourceClient(env=server.env(*server.reader)).s3_settings)


def test_an_endpoint_that_never_answers_times_out_as_unreachable():
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        client = SourceClient(
            env={"AWS_ENDPOINT_URL": f"http://{host}", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
            timeout_s=2,
        )
        began = time.monotonic()
        with pytest.raises(SourceUnreachable, match=host):
            client.head(parse_source_url("s3://models/x"))
        assert time.monotonic() - began < 8


def test_a_fifo_under_a_root_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    client = SourceClient(env={})
    ref = parse_source_url(f"file://{fifo}")
    for call in (lambda: client.head(ref), lambda: client.read_ranges(ref, [(0, 8)])):
        with pytest.raises(SourceNotFound, match="not a file"):
            call()
    assert client.list_dir(ref.parent) == {}


def test_a_sharded_checkpoint_in_a_bucket_lists_by_its_headers(s3, tmp_path):
    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(128, 64) for i in range(4)}
    local = tmp_path / "ckpt"
    local.mkdir()
    sharded_safetensors(local, tensors, shards=2)
    keys = s3.put_tree("runs/7", local)
    assert sorted(keys) == sorted(f"runs/7/{p.name}" for p in local.iterdir())
    client = SourceClient(env=s3.env)
    folder = parse_source_url(s3.url("runs/7/"))
    listing = client.list_dir(folder)
    assert sorted(listing) == sorted(p.name for p in local.iterdir())
    s3.reset_counts()
    index = json.loads(client.read_ranges(folder.child("model.safetensors.index.json"), [(0, 1 << 20)])[0])
    header_bytes = 0
    for shard in sorted(set(index["weight_map"].values())):
        ref = folder.child(shard)
        end, header = _header(client, ref, listing[shard])
        header_bytes += end
        assert set(header) - {"__metadata__"} == {k for k, v in index["weight_map"].items() if v == shard}
        assert listing[shard].size == (local / shard).stat().st_size
    index_size = (local / "model.safetensors.index.json").stat().st_size
    assert s3.served_bytes() == header_bytes + index_size  # headers only: no tensor bytes
    assert s3.served_bytes() < sum(v.size for v in listing.values()) / 10
