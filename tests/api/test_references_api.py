"""Checkpoints registered by reference (issue 17), end to end through the REST API on a real
catalogue: ``file://`` sources under configured roots, ``s3://`` sources on a real S3-protocol
server (moto's standalone server, tests/s3_server.py), listed by header ranges only, their stats
equal to an upload's of the same bytes, a changed source noticed and recomputed, and every way
out of the configured roots and buckets refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ckptscope.services.references import list_source
from tests.factories import cnn_state_dict, save_safetensors, save_torch, seeded, sharded_safetensors
from tests.helpers import csrf_token, make_client, upload, wait_stats

API = "/api/v1/checkpoints"


def _tensors(client, checkpoint_id: str) -> dict[str, dict]:
    body = client.get(f"{API}/{checkpoint_id}/tensors", params={"limit": 1000}).json()
    return {t["name"]: t for t in body["tensors"]}


def _same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name]["stats"], b[name]["stats"]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, float) and isinstance(vb, float) and math.isnan(va):
                assert math.isnan(vb), (name, key)
            else:
                assert va == vb, (name, key, va, vb)


def _reference(client, source: str, **extra):
    return client.post(API, json={"source": source, **extra})


def _state(seed: int) -> dict[str, torch.Tensor]:
    seeded(seed)
    return {f"layers.{i}.weight": torch.randn(64, 32) for i in range(6)} | {"head.bias": torch.zeros(7)}


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


# --- file:// under a configured root ------------------------------------------------------------


def test_a_local_sharded_set_registers_in_place_with_the_stats_of_an_upload(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    (root / "run7").mkdir(parents=True)
    index = sharded_safetensors(root / "run7", _state(1), shards=3)
    before = {p.name: p.stat().st_mtime_ns for p in index.parent.iterdir()}
    with make_client(data_dir, source_roots=str(root)) as client:
        made = _reference(client, index.as_uri())
        assert made.status_code == 201, made.text
        body = made.json()
        assert made.headers["Location"] == f"{API}/{body['id']}"
        assert body["origin"] == "reference"
        assert body["source"]["url"] == index.as_uri()
        assert body["format"] == "sharded-safetensors" and body["tensor_count"] == 7
        assert wait_stats(client, body["id"])["stats_state"] == "done"
        # nothing was copied into the blob store
        assert not any((data_dir / "blobs").rglob("*.safetensors")) and len(list((data_dir / "blobs").iterdir())) == 0
        uploaded = client.post(
            API, files=[("file", (p.name, p.read_bytes())) for p in sorted(index.parent.iterdir())]
        ).json()
        wait_stats(client, uploaded["id"])
        _same_stats(_tensors(client, body["id"]), _tensors(client, uploaded["id"]))
        # the same unchanged source again: one listing, one set of stats
        again = _reference(client, index.as_uri(), name="again").json()
        assert again["sha256"] == body["sha256"] and again["name"] == "again"
        # deleting it leaves the source alone
        assert client.delete(f"{API}/{body['id']}").status_code == 204
        assert client.delete(f"{API}/{again['id']}").status_code == 204
    assert {p.name: p.stat().st_mtime_ns for p in index.parent.iterdir()} == before


def test_a_local_folder_and_a_training_checkpoint_register_and_download_in_place(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    (root / "folder").mkdir(parents=True)
    save_safetensors(cnn_state_dict(), root / "folder" / "model.safetensors")
    ckpt = save_torch({"state_dict": cnn_state_dict(), "epoch": 3}, root / "last.ckpt")
    with make_client(data_dir, source_roots=json.dumps([str(root)])) as client:
        folder = _reference(client, (root / "folder").as_uri())
        assert folder.status_code == 201, folder.text
        assert folder.json()["tensor_count"] == len(cnn_state_dict())
        single = _reference(client, ckpt.as_uri()).json()
        wait_stats(client, single["id"])
        got = client.get(f"{API}/{single['id']}/download")
        assert got.status_code == 200 and got.content == ckpt.read_bytes()


def test_a_changed_local_file_is_listed_again_and_its_stats_recomputed(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    root.mkdir()
    path = save_safetensors(_state(1), root / "model.safetensors")
    with make_client(data_dir, source_roots=str(root)) as client:
        first = _reference(client, path.as_uri()).json()
        wait_stats(client, first["id"])
        old = _tensors(client, first["id"])
        save_safetensors(_state(2) | {"extra": torch.ones(3)}, path)
        now = client.get(f"{API}/{first['id']}").json()
        assert now["sha256"] != first["sha256"] and now["source"]["changed_at"]
        assert now["tensor_count"] == 8
        done = wait_stats(client, first["id"])
        assert done["stats_state"] == "done"
        new = _tensors(client, first["id"])
        assert new["layers.0.weight"]["stats"]["mean"] != old["layers.0.weight"]["stats"]["mean"]
        page = client.get(f"/checkpoints/{first['id']}")
        assert "The source changed" in page.text
        path.unlink()
        gone = client.get(f"{API}/{first['id']}").json()
        assert gone["source"]["missing_at"] and "does not exist" in gone["source"]["missing_reason"]
        assert "could not be read" in client.get(f"/checkpoints/{first['id']}").text


def test_local_sources_outside_the_roots_are_refused(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    root.mkdir()
    outside = save_safetensors(cnn_state_dict(), tmp_path / "secret.safetensors")
    (root / "link.safetensors").symlink_to(outside)
    inside = save_safetensors(cnn_state_dict(), root / "model.safetensors")
    with make_client(data_dir, source_roots=str(root)) as client:
        for url in (outside.as_uri(), (root / "link.safetensors").as_uri()):
            got = _reference(client, url)
            assert got.status_code == 403, (url, got.text)
            assert got.headers["content-type"] == "application/problem+json"
            assert got.json()["code"] == "source_not_allowed"
            assert "secret" not in got.json()["detail"]  # never where a path or a link leads
        dotted = _reference(client, f"file://{root}/../secret.safetensors")  # refused before any lookup
        assert dotted.status_code == 422 and dotted.json()["code"] == "bad_source"
        assert _reference(client, (root / "missing.safetensors").as_uri()).status_code == 404
        assert _reference(client, "http://example.com/x").json()["code"] == "bad_source"
        assert client.post(API, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        assert client.post(API, json={"source": inside.as_uri(), "extra": 1}).status_code == 422
        assert client.get(API).json()["total"] == 0
    with make_client(data_dir) as client:  # no roots configured: local references are off
        got = _reference(client, inside.as_uri())
        assert got.status_code == 403 and "CKPTSCOPE_SOURCE_ROOTS" in got.json()["detail"]


# --- s3:// on a real S3-protocol server ----------------------------------------------------------


def test_an_s3_sharded_set_lists_from_header_ranges_and_gets_an_uploads_stats(tmp_path, data_dir, s3_env):
    s3 = s3_env
    seeded(3)
    big = {f"blocks.{i}.weight": torch.randn(512, 512) for i in range(12)}
    (tmp_path / "local").mkdir()
    index = sharded_safetensors(tmp_path / "local", big, shards=4)
    s3.put_tree("model/", index.parent)
    total = sum(p.stat().st_size for p in index.parent.iterdir())
    with make_client(data_dir, source_buckets=s3.bucket) as client:
        core = client.app.state.core
        s3.reset_counts()  # the listing alone (registering also starts the stats job, which reads it all)
        listed = list_source(core, core.source_policy.check(s3.url("model/" + index.name)))
        assert len(listed.listing.tensors) == 12 and len(listed.objects) == 5
        listed_bytes = s3.served_bytes()
        assert 0 < listed_bytes < total / 10, (listed_bytes, total)
        assert all(method in ("HEAD", "GET") for method, _, _ in s3.requests())
        made = _reference(client, s3.url("model/" + index.name))
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["source"]["url"] == s3.url("model/" + index.name)
        assert wait_stats(client, body["id"], timeout=60)["stats_state"] == "done"
        uploaded = client.post(
            API, files=[("file", (p.name, p.read_bytes())) for p in sorted(index.parent.iterdir())]
        ).json()
        wait_stats(client, uploaded["id"])
        _same_stats(_tensors(client, body["id"]), _tensors(client, uploaded["id"]))
        got = client.get(f"{API}/{body['id']}/download", params={"file": index.name})
        assert got.status_code == 422 and got.json()["code"] == "remote_source"


def test_a_changed_object_is_noticed_and_recomputed(tmp_path, data_dir, s3_env):
    s3 = s3_env
    path = save_safetensors(_state(1), tmp_path / "model.safetensors")
    s3.put("m/model.safetensors", path)
    with make_client(data_dir, source_buckets=json.dumps([s3.bucket])) as client:
        first = _reference(client, s3.url("m/model.safetensors")).json()
        wait_stats(client, first["id"])
        save_safetensors(_state(5), path)
        s3.put("m/model.safetensors", path)
        now = client.get(f"{API}/{first['id']}").json()
        assert now["sha256"] != first["sha256"] and now["source"]["changed_at"]
        wait_stats(client, first["id"])
        uploaded = upload(client, path).json()
        wait_stats(client, uploaded["id"])
        _same_stats(_tensors(client, first["id"]), _tensors(client, uploaded["id"]))


def test_s3_sources_outside_the_allowlist_or_missing_get_clear_errors(tmp_path, data_dir, s3_env):
    s3 = s3_env
    other = s3.make_bucket()
    path = save_safetensors(cnn_state_dict(), tmp_path / "model.safetensors")
    s3.put("model.safetensors", path)
    with make_client(data_dir, source_buckets=s3.bucket) as client:
        got = _reference(client, f"s3://{other}/model.safetensors")
        assert got.status_code == 403 and got.json()["code"] == "source_not_allowed"
        got = _reference(client, s3.url("nope.safetensors"))
        assert got.status_code == 404 and got.json()["code"] == "source_not_found"
        assert _reference(client, "s3://Bad_Bucket/x").status_code == 422
        assert client.get(API).json()["total"] == 0


def test_torch_zip_and_legacy_files_from_s3_list_and_compute_like_uploads(tmp_path, data_dir, s3_env):
    s3 = s3_env
    zipped = save_torch({"model": cnn_state_dict(), "step": 7}, tmp_path / "train.pt")
    legacy = save_torch(cnn_state_dict(), tmp_path / "legacy.bin", legacy=True)
    with make_client(data_dir, source_buckets=s3.bucket) as client:
        for path in (zipped, legacy):
            s3.put(path.name, path)
            ref = _reference(client, s3.url(path.name))
            assert ref.status_code == 201, ref.text
            wait_stats(client, ref.json()["id"])
            up = upload(client, path).json()
            wait_stats(client, up["id"])
            _same_stats(_tensors(client, ref.json()["id"]), _tensors(client, up["id"]))


def test_the_browser_form_opens_a_source_where_it_lives(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    root.mkdir()
    path = save_safetensors(cnn_state_dict(), root / "model.safetensors")
    with make_client(data_dir, source_roots=str(root)) as client:
        assert "Open where it lives" in client.get("/").text
        token = csrf_token(client)
        got = client.post("/reference", data={"source": path.as_uri(), "csrf_token": token}, follow_redirects=False)
        assert got.status_code == 303, got.text
        page = client.get(got.headers["location"])
        assert "Opened where it lives" in page.text and path.as_uri() in page.text
        refused = client.post("/reference", data={"source": (tmp_path / "x").as_uri(), "csrf_token": token})
        assert refused.status_code == 403 and "CKPTSCOPE_SOURCE_ROOTS" in refused.text


def test_the_cli_inspects_an_s3_source_like_the_local_file(tmp_path, s3_env):
    s3 = s3_env
    path = save_safetensors(_state(4), tmp_path / "model.safetensors")
    s3.put("cli/model.safetensors", path)
    env = os.environ | s3.env
    cmd = [sys.executable, "-m", "ckptscope.cli", "inspect", "--json"]
    remote = subprocess.run([*cmd, s3.url("cli/model.safetensors")], capture_output=True, text=True, env=env)
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([*cmd, str(path)], capture_output=True, text=True, env=env)
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    assert [t["stats"] for t in got["tensors"]] == [t["stats"] for t in want["tensors"]]
    missing = subprocess.run([*cmd, s3.url("cli/none.safetensors")], capture_output=True, text=True, env=env)
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr


def test_a_reference_is_safe_to_retry_with_an_idempotency_key(tmp_path, data_dir):
    root = tmp_path / "ckpts"
    root.mkdir()
    path = save_safetensors(cnn_state_dict(), root / "model.safetensors")
    with make_client(data_dir, source_roots=str(root)) as client:
        headers = {"Idempotency-Key": "ref-1"}
        first = client.post(API, json={"source": path.as_uri()}, headers=headers)
        again = client.post(API, json={"source": path.as_uri()}, headers=headers)
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        other = client.post(API, json={"source": path.as_uri(), "name": "x"}, headers=headers)
        assert other.status_code == 422 and other.json()["code"] == "idempotency-key-reused"


@pytest.mark.slow
def test_stats_of_an_s3_source_on_a_local_dask_cluster_equal_an_uploads(tmp_path, data_dir, s3_env):
    s3 = s3_env
    (tmp_path / "local").mkdir()
    seeded(9)
    index = sharded_safetensors(tmp_path / "local", {f"l.{i}.w": torch.randn(128, 64) for i in range(6)}, shards=3)
    s3.put_tree("dask/", index.parent)
    with make_client(data_dir, source_buckets=s3.bucket, dask_scheduler="local:2") as client:
        ref = _reference(client, s3.url("dask/" + index.name)).json()
        assert wait_stats(client, ref["id"], timeout=120)["stats_state"] == "done"
        job = client.get(f"/api/v1/jobs/{ref['job_id']}").json()
        assert job["state"] == "done" and job["done"] == job["total"] > 0
    with make_client(tmp_path / "other") as client:  # the local engine, on an upload of the same files
        up = client.post(API, files=[("file", (p.name, p.read_bytes())) for p in sorted(index.parent.iterdir())])
        wait_stats(client, up.json()["id"])
        want = _tensors(client, up.json()["id"])
    with make_client(data_dir, source_buckets=s3.bucket) as client:
        _same_stats(_tensors(client, ref["id"]), want)


def _gguf_file(path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list([f"<tok{i}>" for i in range(500)])
    writer.add_tensor(
        "blk.0.ffn.weight",
        quants.quantize(rng.standard_normal((64, 256)).astype(np.float32), GGMLQuantizationType.Q8_0),
        raw_dtype=GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("blk.0.norm.weight", rng.standard_normal(256).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _dcp_dir(path):
    import warnings

    import torch.distributed.checkpoint as dcp

    seeded(2)
    state = {"model": {f"layer{i}.weight": torch.randn(64, 32) for i in range(4)}, "step": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)))
    return path


def test_gguf_and_dcp_from_s3_list_and_compute_like_local_files(tmp_path, data_dir, s3_env):
    s3 = s3_env
    gguf_path = _gguf_file(tmp_path / "model.gguf")
    dcp_path = _dcp_dir(tmp_path / "dcp")
    s3.put("g/model.gguf", gguf_path)
    s3.put_tree("d/", dcp_path)
    roots = tmp_path / "roots"
    roots.mkdir()
    with make_client(data_dir, source_buckets=s3.bucket, source_roots=str(tmp_path)) as client:
        for remote, local in ((s3.url("g/model.gguf"), gguf_path), (s3.url("d/"), dcp_path)):
            ref = _reference(client, remote)
            assert ref.status_code == 201, ref.text
            assert wait_stats(client, ref.json()["id"], timeout=60)["stats_state"] == "done"
            here = _reference(client, local.as_uri()).json()  # the same files read in place
            wait_stats(client, here["id"])
            assert ref.json()["format"] == here["format"]
            _same_stats(_tensors(client, ref.json()["id"]), _tensors(client, here["id"]))


def test_bad_credentials_and_no_permission_are_clear_403s(tmp_path, data_dir, s3_auth_server, monkeypatch):
    server = s3_auth_server
    url = f"s3://{server.bucket}/{server.key}"
    for keys in (("AKIAIOSFODNN7NOTREAL", "not-the-secret"), server.stranger):
        for name, value in server.env(*keys).items():
            monkeypatch.setenv(name, value)
        with make_client(data_dir, source_buckets=server.bucket) as client:
            got = _reference(client, url)
            assert got.status_code == 403, got.text
            assert got.json()["code"] == "source_denied"
            assert keys[1] not in got.text  # never the secret
    for name, value in server.env(*server.reader).items():
        monkeypatch.setenv(name, value)
    with make_client(data_dir, source_buckets=server.bucket) as client:
        got = _reference(client, url)
        assert got.status_code in (201, 422), got.text  # allowed: read (whatever the object holds)
        assert got.json().get("code") != "source_denied"


def test_an_unreachable_endpoint_is_a_prompt_502(tmp_path, data_dir, monkeypatch):
    from tests.servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with make_client(data_dir, source_buckets="models") as client:
        got = _reference(client, "s3://models/model.safetensors")
        assert got.status_code == 502 and got.json()["code"] == "source_unreachable"


@pytest.mark.slow
def test_the_cli_computes_an_s3_sources_stats_on_a_local_dask_cluster(tmp_path, s3_env):
    s3 = s3_env
    path = save_safetensors(_state(6), tmp_path / "model.safetensors")
    s3.put("cli/dask.safetensors", path)
    env = os.environ | s3.env
    cmd = [sys.executable, "-m", "ckptscope.cli", "inspect", "--json"]
    remote = subprocess.run(
        [*cmd, "--dask", "local:2", s3.url("cli/dask.safetensors")], capture_output=True, text=True, env=env
    )
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([*cmd, str(path)], capture_output=True, text=True, env=env)
    assert [t["stats"] for t in json.loads(remote.stdout)["tensors"]] == [
        t["stats"] for t in json.loads(local.stdout)["tensors"]
    ]
    bad = subprocess.run([*cmd, "--dask", "nope", str(path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--dask" in bad.stderr and "Traceback" not in bad.stderr


def test_previews_values_diffs_and_exports_of_an_s3_source_read_its_bytes(tmp_path, data_dir, s3_env):
    s3 = s3_env
    state = _state(8) | {"tiny": torch.arange(6, dtype=torch.float32)}
    path = save_safetensors(state, tmp_path / "model.safetensors")
    s3.put("ops/model.safetensors", path)
    with make_client(data_dir, source_buckets=s3.bucket) as client:
        ref = _reference(client, s3.url("ops/model.safetensors")).json()
        up = upload(client, path).json()
        wait_stats(client, ref["id"])
        wait_stats(client, up["id"])
        # a heatmap and a spectrum of a tensor that lives in the bucket, as of the uploaded copy
        for suffix in ("preview.png", "spectrum"):
            got = client.get(f"{API}/{ref['id']}/tensors/layers.0.weight/{suffix}")
            want = client.get(f"{API}/{up['id']}/tensors/layers.0.weight/{suffix}")
            assert got.status_code == 200 == want.status_code, got.text
            if suffix == "spectrum":
                assert got.json()["values"] == want.json()["values"]
            else:
                assert got.content == want.content
        page = client.get(f"/checkpoints/{ref['id']}", params={"tensor": "tiny"})
        assert page.status_code == 200 and "5" in page.text
        # the diff reads values only where the digests differ: here none, and every tensor is identical
        diff = client.get("/api/v1/diff", params={"a": ref["id"], "b": up["id"]}).json()
        assert {row["status"] for row in diff["tensors"]} == {"identical"}
        exported = client.post(f"/api/v1/checkpoints/{ref['id']}/export", json={"include": ["layers.1"]})
        assert exported.status_code == 201, exported.text
        data = client.get(f"{API}/{exported.json()['id']}/download").content
    from safetensors.torch import load

    got = load(data)
    assert got.keys() == {"layers.1.weight"} and torch.equal(got["layers.1.weight"], state["layers.1.weight"])
    assert not list((data_dir / "tmp").glob("ckptscope-ranges-*"))  # the copied ranges are gone
