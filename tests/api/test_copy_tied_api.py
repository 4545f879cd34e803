"""Copy into a tied transformers checkpoint through every face (REST, UI preview, CLI): the report
names the tied aliases it updated, a strict copy refuses two sources filling one tied storage with
different values, and the written file keeps the tie with load_state_dict's values."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import torch

from tests.helpers import csrf_token, upload
from tests.services.test_copy_tied import (
    BOTH,
    llama,
    load,
    load_state_dict_result,
    save_pretrained_bin,
    seeded,
    selection,
    storage,
    untied_pair,
)

EMBED = {"model.embed_tokens": "model.embed_tokens"}
ALIAS = {"name": "lm_head.weight", "via": "model.embed_tokens.weight", "source": "model.embed_tokens.weight"}


def downloaded(client, checkpoint_id: str) -> dict[str, torch.Tensor]:
    r = client.get(f"/api/v1/checkpoints/{checkpoint_id}/download")
    assert r.status_code == 200, r.text
    return torch.load(io.BytesIO(r.content), weights_only=True)


def test_rest_copy_into_a_tied_target_reports_and_keeps_the_tie(client, tmp_path):
    source = save_pretrained_bin(seeded(llama, 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    ida = upload(client, source, "a.bin").json()["id"]
    idb = upload(client, target, "b.bin").json()["id"]

    dry = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": EMBED, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["report"]["aliases_updated"] == [ALIAS]

    r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": EMBED})
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["aliases_updated"] == [ALIAS] and report["counts"]["aliases_updated"] == 1
    assert report["tied_conflicts"] == []
    got = downloaded(client, r.json()["checkpoint"]["id"])
    want = load_state_dict_result(llama, target, selection(load(source), EMBED))
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])
    listed = client.get(f"/api/v1/checkpoints/{r.json()['checkpoint']['id']}/tensors", params={"kind": "alias"})
    assert [t["name"] for t in listed.json()["tensors"]] == ["lm_head.weight"]  # still listed as tied


def test_rest_tied_conflict_is_refused_when_strict_and_resolved_like_torch_when_not(client, tmp_path):
    source, source_state = untied_pair(tmp_path)
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    ida = upload(client, source, "untied.pt").json()["id"]
    idb = upload(client, target, "b.bin").json()["id"]

    for dry_run in (True, False):
        r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": BOTH, "dry_run": dry_run})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
        problem = r.json()
        assert problem["code"] == "tied_conflict"
        assert "'model.embed_tokens.weight'" in problem["detail"] and "'lm_head.weight'" in problem["detail"]
    assert client.get("/api/v1/checkpoints").json()["total"] == 2  # nothing written

    r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": BOTH, "strict": False})
    assert r.status_code == 201, r.text
    conflicts = r.json()["report"]["tied_conflicts"]
    assert len(conflicts) == 1 and conflicts[0]["winner"] == {"source": "lm_head.weight", "target": "lm_head.weight"}
    got = downloaded(client, r.json()["checkpoint"]["id"])
    want = load_state_dict_result(llama, target, selection(source_state, BOTH))
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(got["model.embed_tokens.weight"], source_state["lm_head.weight"])
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])


def test_ui_preview_shows_the_tied_aliases(client, tmp_path):
    ida = upload(client, save_pretrained_bin(seeded(llama, 1), tmp_path / "a"), "a.bin").json()["id"]
    idb = upload(client, save_pretrained_bin(seeded(llama, 2), tmp_path / "b"), "b.bin").json()["id"]
    form = {"csrf_token": csrf_token(client), "module": "model.embed_tokens", "target": idb, "strict": "on"}
    r = client.post(f"/checkpoints/{ida}/copy", data=form | {"action": "preview"}, headers={"hx-request": "true"})
    assert r.status_code == 200, r.text
    assert "1 tied aliases updated" in r.text
    assert '<th>tied alias</th><td class="mono">lm_head.weight = model.embed_tokens.weight' in r.text


def test_cli_copy_reports_the_tied_aliases(tmp_path):
    source = save_pretrained_bin(seeded(llama, 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    out = tmp_path / "out.pt"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ckptscope.cli", "copy", str(source), str(target), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    r = cli("--map", "model.embed_tokens=model.embed_tokens", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "tied aliases updated 1" in r.stdout
    assert "alias updated: lm_head.weight (tied to model.embed_tokens.weight" in r.stdout
    got = load(out)
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], load(source)["model.embed_tokens.weight"])

    r = cli("--map", "model.embed_tokens=model.embed_tokens", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["report"]["aliases_updated"] == [ALIAS]
