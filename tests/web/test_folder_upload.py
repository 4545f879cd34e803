"""A folder upload: in the browser (the "Upload a folder" control, a real uvicorn server and
chromium), and the same files over REST as one multipart upload, each file named by its path in the
folder. The server reads them by the folder reader's rules; config and tokenizer files, hidden files
and sub-folders are set aside (not stored), named in the listing's warnings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect

from tests import factories as f
from tests import folder_producers as producers
from tests.helpers import database_env, wait_stats
from tests.servers import Server


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upload-folders")
    sharded = producers.hf_model(root, max_shard_size="40KB")
    (sharded / "tokenizer.json").write_text('{"version": "1.0"}')
    (sharded / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return {"sharded": sharded, "trainer": producers.trainer_checkpoint(root), "lora": producers.peft_adapter(root)}


def folder_files(folder: Path, prefix: str | None = None) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts as a browser sends a folder: each file named by its path inside the folder,
    starting with the folder's own name."""
    prefix = folder.name if prefix is None else prefix
    parts = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            parts.append(("file", (f"{prefix}/{rel}" if prefix else rel, p.read_bytes())))
    return parts


def tensors_of(client, checkpoint_id: str, root: str | None = None) -> producers.Truth:
    params = {"limit": 1000} | ({"root": root} if root is not None else {})
    page = client.get(f"/api/v1/checkpoints/{checkpoint_id}/tensors", params=params).json()
    return {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in page["tensors"]}


def blob_count(data_dir: Path) -> int:
    return sum(1 for p in (data_dir / "blobs").rglob("*") if p.is_file())


def test_rest_upload_of_a_model_folder(client, data_dir, made):
    folder = made["sharded"]
    r = client.post("/api/v1/checkpoints", files=folder_files(folder))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == folder.name and body["format"] == "sharded-safetensors"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    truth = producers.weights_truth(folder, shards)
    assert tensors_of(client, body["id"]) == truth
    detail = client.get(f"/api/v1/checkpoints/{body['id']}").json()
    # only the index and its shards are stored; the rest is named in the warnings
    assert sorted(x["name"] for x in detail["files"]) == sorted([*shards, "model.safetensors.index.json"])
    assert "folder: read model.safetensors.index.json (model weights)" in detail["warnings"]
    ignored = next(w for w in detail["warnings"] if w.startswith("ignored (not a checkpoint file)"))
    assert "config.json" in ignored and "tokenizer.json" in ignored and ".DS_Store" not in ignored
    assert blob_count(data_dir) == len(shards) + 1  # nothing else was kept
    assert wait_stats(client, body["id"])["stats_state"] == "done"


def test_rest_upload_of_a_trainer_checkpoint_folder(client, made):
    folder = made["trainer"]
    r = client.post("/api/v1/checkpoints", files=folder_files(folder))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "checkpoint-1" and body["format"] == "trainer-safetensors"
    detail = client.get(f"/api/v1/checkpoints/{body['id']}").json()
    assert detail["default_root"] == "model"
    assert {r["path"] for r in detail["roots"]} >= {"model", "optimizer", "optimizer.state", "rng_state"}
    assert detail["metadata"]["trainer_state.global_step"] == 1
    stored = {x["name"] for x in detail["files"]}
    assert stored == {"model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"} | {
        "trainer_state.json"
    }
    assert tensors_of(client, body["id"]) == producers.weights_truth(folder, ["model.safetensors"])
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert tensors_of(client, body["id"], "optimizer") == producers.flatten(optimizer)


def test_rest_upload_with_plain_names(client, made):
    """Plain file names (a script's multi-file upload): the same rules, named by its weights file."""
    folder = made["lora"]
    r = client.post("/api/v1/checkpoints", files=folder_files(folder, prefix=""))
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "adapter_model.safetensors"
    assert tensors_of(client, r.json()["id"]) == producers.weights_truth(folder, ["adapter_model.safetensors"])


def test_rest_upload_with_hostile_relative_paths(client, made):
    """Relative names are text: no part leaves the folder, sub-folders are set aside."""
    folder = made["lora"]
    parts = folder_files(folder, prefix="../../etc")
    parts.append(("file", ("../../etc/sub/deeper/model.safetensors", b"not read")))
    parts.append(("file", ("..\\..\\etc\\._adapter_model.safetensors", b"macOS resource fork")))
    parts.append(("file", ("../../etc/.git/objects/ab", b"hidden folder")))
    r = client.post("/api/v1/checkpoints", files=parts)
    assert r.status_code == 201, r.text
    detail = client.get(f"/api/v1/checkpoints/{r.json()['id']}").json()
    assert detail["name"] == "etc"
    assert "ignored (in a sub-folder): sub/deeper/model.safetensors" in detail["warnings"]
    assert not any(".git" in w or "._adapter" in w for w in detail["warnings"])  # hidden: silently
    assert {x["name"] for x in detail["files"]} == {"adapter_model.safetensors"}
    assert tensors_of(client, detail["id"]) == producers.weights_truth(folder, ["adapter_model.safetensors"])


def test_rest_folder_refusals(client, data_dir, made, tmp_path):
    before = blob_count(data_dir)
    docs = [("file", ("docs/README.md", b"# hi")), ("file", ("docs/config.json", b"{}"))]
    r = client.post("/api/v1/checkpoints", files=docs)
    assert r.status_code == 422 and r.json()["code"] == "no_checkpoint"
    assert r.json()["detail"].endswith("no checkpoint in this folder: found README.md, config.json")
    # a weights file that the checkpoint does not use is still refused (not silently dropped)
    parts = folder_files(made["sharded"])
    stray = f.save_torch({"x": torch.ones(1)}, tmp_path / "extra.bin")
    parts.append(("file", (f"{made['sharded'].name}/extra.bin", stray.read_bytes())))
    r = client.post("/api/v1/checkpoints", files=parts)
    assert r.status_code == 422 and r.json()["code"] == "unlisted_file" and "extra.bin" in r.json()["detail"]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert blob_count(data_dir) == before  # a refused upload leaves nothing behind


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("folder-server") / "data"
    srv = Server(data, database_env())
    yield srv.base
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.mark.e2e
def test_browser_folder_upload_shows_the_tensors(server, browser, made, tmp_path):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(made["trainer"], folder)
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "objects" / "ab12").write_bytes(b"not sent: a hidden folder")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_bytes(b"sent, set aside by the server")
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    expect(page.locator("label[for=folder-input]")).to_have_text("Upload a folder")
    page.set_input_files("#folder-input", str(folder))
    page.click("#folder-form button[type=submit]")
    page.wait_for_url("**/checkpoints/*", timeout=60000)
    expect(page.locator("h1")).to_have_text("checkpoint-1")  # relative paths reached the server
    table = page.locator("#tensor-table")
    truth = producers.weights_truth(folder, ["model.safetensors"])
    expect(table).to_contain_text(f"{len(truth)} tensors")
    name = sorted(truth)[0]
    expect(table).to_contain_text(name)
    body = page.locator("body")
    expect(body).to_contain_text("folder: read model.safetensors (transformers Trainer checkpoint)")
    expect(body).to_contain_text("ignored (not a checkpoint file): config.json, generation_config.json")
    expect(body).to_contain_text("ignored (in a sub-folder): runs/events.out")
    assert ".git" not in body.inner_text() and ".DS_Store" not in body.inner_text()  # never sent
    context.close()
    assert errors == []
