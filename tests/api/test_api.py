"""The REST API through FastAPI's TestClient, on a real SQLite catalogue and blob directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import factories as f
from tests.helpers import make_client, upload, wait_stats


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"JSON carried a {name} literal")

    return json.loads(text, parse_constant=refuse)


def leftovers(data_dir: Path) -> tuple[list[Path], list[Path]]:
    blobs = [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]
    tmp = list((data_dir / "tmp").iterdir())
    return blobs, tmp


def test_upload_then_read_tensors_stats_and_tree(client, tmp_path):
    sd = f.cnn_state_dict()
    r = upload(client, f.save_torch(sd, tmp_path / "cnn.pth"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "torch-zip" and body["tensor_count"] == len(sd) and body["name"] == "cnn.pth"
    assert len(body["sha256"]) == 64 and body["job_id"]
    assert body["total_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    wait_stats(client, body["id"])
    job = client.get(f"/api/v1/jobs/{body['job_id']}").json()
    assert job["state"] == "done" and job["progress"] == 1.0 and job["done"] == job["total"]

    page = client.get(f"/api/v1/checkpoints/{body['id']}/tensors", params={"limit": 100}).json()
    assert page["total"] == len(sd) and page["stats_state"] == "done"
    by_name = {t["name"]: t for t in page["tensors"]}
    w = sd["head.weight"].double()
    stats = by_name["head.weight"]["stats"]
    assert stats["mean"] == pytest.approx(w.mean().item(), rel=1e-9)
    assert stats["std"] == pytest.approx(w.std().item(), rel=1e-6)
    assert stats["l2"] == pytest.approx(w.norm().item(), rel=1e-6)
    assert sum(stats["hist"]) == w.numel()
    assert by_name["features.1.running_var"]["kind"] == "buffer"

    one = client.get(f"/api/v1/checkpoints/{body['id']}/tensors/head.weight").json()
    assert one["shape"] == [10, 16] and one["stats"]["max"] == pytest.approx(w.max().item())

    tree = client.get(f"/api/v1/checkpoints/{body['id']}/tree").json()["tree"]
    assert [c["name"] for c in tree["children"]] == ["features", "head"]
    features = tree["children"][0]
    assert features["tensor_count"] == 9 and features["buffer_count"] == 3
    shallow = client.get(f"/api/v1/checkpoints/{body['id']}/tree", params={"path": "features", "depth": 1}).json()
    assert [c["name"] for c in shallow["tree"]["children"]] == ["0", "1", "3"]
    assert shallow["tree"]["children"][0]["children"] is None  # depth 1: grandchildren left out


def test_raw_body_upload_with_filename(client, tmp_path):
    path = f.save_safetensors({"a.w": torch.ones(3)}, tmp_path / "x.safetensors")
    r = client.post(
        "/api/v1/checkpoints",
        params={"filename": "raw.safetensors"},
        content=path.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "raw.safetensors" and r.json()["format"] == "safetensors"


def test_sharded_set_upload_and_missing_shard(client, data_dir, tmp_path):
    sd = f.cnn_state_dict()
    index = f.sharded_safetensors(tmp_path, sd, shards=2)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    files = [("file", (p.name, p.read_bytes())) for p in [index, *shards]]
    r = client.post("/api/v1/checkpoints", files=files)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "sharded-safetensors" and r.json()["tensor_count"] == len(sd)
    detail = client.get(f"/api/v1/checkpoints/{r.json()['id']}").json()
    assert sorted(x["name"] for x in detail["files"]) == sorted(p.name for p in [index, *shards])
    wait_stats(client, r.json()["id"])
    before = leftovers(data_dir)

    r = client.post("/api/v1/checkpoints", files=files[:2])  # one shard missing
    assert r.status_code == 422
    assert "was not provided" in r.json()["detail"] and r.json()["code"] == "missing_shard"
    assert leftovers(data_dir) == before  # shared blobs stay, nothing new remains


def test_list_get_delete_and_blob_cleanup(client, data_dir, tmp_path):
    path = f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")
    first = upload(client, path).json()
    wait_stats(client, first["id"])
    second = upload(client, path, name="again.pt").json()
    assert second["sha256"] == first["sha256"] and second["id"] != first["id"]
    assert second["stats_state"] == "done"  # same bytes: stats come from the cache
    assert len(leftovers(data_dir)[0]) == 1  # one blob for both
    listed = client.get("/api/v1/checkpoints").json()["items"]
    assert [c["id"] for c in listed] == [second["id"], first["id"]]

    assert client.delete(f"/api/v1/checkpoints/{first['id']}").status_code == 204
    assert len(leftovers(data_dir)[0]) == 1  # still used by the second
    assert client.get(f"/api/v1/checkpoints/{second['id']}/tensors").json()["stats_state"] == "done"
    assert client.delete(f"/api/v1/checkpoints/{second['id']}").status_code == 204
    assert leftovers(data_dir) == ([], [])
    r = client.get(f"/api/v1/checkpoints/{second['id']}")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert client.get("/api/v1/checkpoints").json()["total"] == 0


def test_nested_checkpoint_roots_and_metadata(client, tmp_path):
    body = upload(client, f.training_checkpoint(tmp_path / "last.ckpt")).json()
    detail = client.get(f"/api/v1/checkpoints/{body['id']}").json()
    assert detail["default_root"] == "state_dict"
    assert {r["path"] for r in detail["roots"]} >= {"", "state_dict", "optimizer", "optimizer.state"}
    assert detail["metadata"]["epoch"] == 7
    default = client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()
    assert default["root"] == "state_dict" and default["total"] == 11
    opt = client.get(f"/api/v1/checkpoints/{body['id']}/tensors", params={"root": "optimizer.state"}).json()
    assert any(t["name"] == "0.exp_avg_sq" for t in opt["tensors"])
    r = client.get(f"/api/v1/checkpoints/{body['id']}/tensors", params={"root": "nope"})
    assert r.status_code == 404 and "no root 'nope'" in r.json()["detail"]


def test_tensor_filters_sorting_and_pagination(client, tmp_path):
    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.linspace(-1, 1, 10) * (i + 1) for i in range(12)}
    tensors["layers.3.norm.running_mean"] = torch.zeros(4)
    tensors["bad.weight"] = torch.tensor([1.0, float("nan"), float("inf")])
    body = upload(client, f.save_safetensors(tensors, tmp_path / "m.safetensors")).json()
    wait_stats(client, body["id"])
    url = f"/api/v1/checkpoints/{body['id']}/tensors"

    page = client.get(url, params={"prefix": "layers.1", "limit": 50}).json()
    assert sorted(t["name"] for t in page["tensors"]) == ["layers.1.weight", "layers.10.weight", "layers.11.weight"]
    assert client.get(url, params={"search": "NORM"}).json()["total"] == 1
    assert [t["name"] for t in client.get(url, params={"kind": "buffer"}).json()["tensors"]] == [
        "layers.3.norm.running_mean"
    ]
    nonfinite = client.get(url, params={"nonfinite": True}).text
    assert [t["name"] for t in strict_json(nonfinite)["tensors"]] == ["bad.weight"]
    assert strict_json(nonfinite)["tensors"][0]["stats"]["nan"] == 1

    by_std = client.get(url, params={"sort": "std", "desc": True, "limit": 3}).json()
    assert [t["name"] for t in by_std["tensors"]] == ["layers.11.weight", "layers.10.weight", "layers.9.weight"]
    p1 = client.get(url, params={"limit": 5, "offset": 0}).json()
    p3 = client.get(url, params={"limit": 5, "offset": 10}).json()
    assert p1["total"] == 14 and len(p1["tensors"]) == 5 and len(p3["tensors"]) == 4
    r = client.get(url, params={"sort": "bogus"})
    assert r.status_code == 422 and r.json()["code"] == "validation" and "'std'" in r.json()["detail"]
    r = client.get(url, params={"limit": 0})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def test_nan_and_inf_never_break_json(client, tmp_path):
    tensors = {"all_nan": torch.full((4,), float("nan")), "inf": torch.tensor([float("inf"), -float("inf")])}
    body = upload(client, f.save_safetensors(tensors, tmp_path / "n.safetensors")).json()
    wait_stats(client, body["id"])
    page = strict_json(client.get(f"/api/v1/checkpoints/{body['id']}/tensors").text)
    stats = {t["name"]: t["stats"] for t in page["tensors"]}
    assert stats["all_nan"]["nan"] == 4 and stats["all_nan"]["mean"] is None
    assert stats["inf"]["inf"] == 2 and stats["inf"]["max"] is None
    tree = strict_json(client.get(f"/api/v1/checkpoints/{body['id']}/tree").text)
    assert tree["tree"]["nan"] == 4 and tree["tree"]["inf"] == 2


def test_stats_pending_does_not_block(data_dir, tmp_path, monkeypatch):
    from ckptscope.jobs.runner import JobRunner

    monkeypatch.setattr(JobRunner, "_run_stats", lambda self, job_id, key: None)
    with make_client(data_dir) as client:
        body = upload(client, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()
        page = client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()
        assert page["stats_state"] == "pending"
        assert all(t["stats"] is None for t in page["tensors"])
        one = client.get(f"/api/v1/checkpoints/{body['id']}/tensors/head.weight").json()
        assert one["stats"] is None and one["stats_state"] == "pending"
        assert client.get(f"/api/v1/jobs/{body['job_id']}").json()["state"] == "queued"


def test_stats_survive_a_restart_and_are_not_recomputed(data_dir, tmp_path, monkeypatch):
    with make_client(data_dir) as client:
        body = upload(client, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()
        wait_stats(client, body["id"])
        before = client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()
    import ckptscope.stats.engine as engine

    monkeypatch.setattr(engine, "compute_stats", lambda *a, **k: pytest.fail("stats recomputed"))
    with make_client(data_dir) as client:
        after = client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()
        assert after == before
        again = upload(client, tmp_path / "a.pt").json()
        assert again["stats_state"] == "done"


@pytest.mark.parametrize(
    ("content", "code", "fragment"),
    [
        (b"\x00garbage" * 50, "unknown_format", "unrecognised file"),
        (b"", None, "empty"),
        (b"PK\x03\x04" + bytes(100), "corrupt_zip", "zip"),
    ],
)
def test_unreadable_uploads_are_422_and_leave_nothing(client, data_dir, content, code, fragment):
    r = client.post("/api/v1/checkpoints", files={"file": ("bad.pt", content)})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert problem["status"] == 422 and fragment in problem["detail"]
    if code:
        assert problem["code"] == code
    assert leftovers(data_dir) == ([], [])
    assert client.get("/api/v1/checkpoints").json()["total"] == 0


def test_oversized_uploads_are_413_and_leave_nothing(data_dir, tmp_path):
    path = f.save_torch({"w": torch.randn(1000)}, tmp_path / "big.pt")
    with make_client(data_dir, max_upload_bytes=2000) as client:
        r = upload(client, path)  # declared Content-Length: refused before reading
        assert r.status_code == 413 and r.json()["code"] == "too_large"

        def chunks():  # no Content-Length: refused while streaming
            data = path.read_bytes()
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        r = client.post("/api/v1/checkpoints", params={"filename": "big.pt"}, content=chunks())
        assert r.status_code == 413
        assert leftovers(data_dir) == ([], [])
        small = f.save_torch({"w": torch.randn(10)}, tmp_path / "small.pt")
        assert upload(client, small).status_code == 201


def test_unknown_ids_are_404_problems(client):
    for url in (
        "/api/v1/checkpoints/nope",
        "/api/v1/checkpoints/nope/tree",
        "/api/v1/checkpoints/nope/tensors",
        "/api/v1/checkpoints/nope/tensors/x",
        "/api/v1/jobs/nope",
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"]
    assert client.delete("/api/v1/checkpoints/nope").status_code == 404


def test_a_lone_index_cannot_reach_other_blobs(client, tmp_path):
    """Shard names resolve among the files of one upload, never inside the blob store."""
    import hashlib

    st = f.save_safetensors({"secret": torch.ones(3)}, tmp_path / "secret.safetensors")
    assert upload(client, st).status_code == 201
    sha = hashlib.sha256(st.read_bytes()).hexdigest()
    index = tmp_path / "model.safetensors.index.json"
    # the other upload's blob sits in blobs/<sha[:2]>/<sha>; name it as a shard with a matching prefix
    index.write_text(json.dumps({"weight_map": {"secret": f"{sha}.safetensors", "x": sha}}))
    r = client.post("/api/v1/checkpoints", files={"file": (index.name, index.read_bytes())})
    assert r.status_code == 422 and r.json()["code"] in ("missing_shard", "bad_index")
