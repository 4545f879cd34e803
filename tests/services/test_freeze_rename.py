"""A freeze plan embedded in an export that renames: the plan names the exported file's tensors.

Each test reads the plan back from the written file's own metadata (safetensors ``__metadata__``)
and checks it freezes exactly the tensors that came from the frozen modules, under their new
names, over the service, REST and the UI's form alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ckptscope.errors import Invalid
from ckptscope.formats import open_checkpoint
from ckptscope.services import catalogue_ops as ops
from ckptscope.services.operations import export_with_plan
from tests.helpers import csrf_token, upload


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.norm = nn.LayerNorm(4)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(Tiny().state_dict(), str(path))
    return path


def written_plan(client, checkpoint_id: str, tmp_path: Path) -> tuple[dict, list[str]]:
    """The freeze plan and the tensor names of an exported file, as the file itself holds them."""
    r = client.get(f"/api/v1/checkpoints/{checkpoint_id}/download")
    assert r.status_code == 200, r.text
    path = tmp_path / f"{checkpoint_id}.safetensors"
    path.write_bytes(r.content)
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ckptscope.freeze_plan"]), list(f.keys())


RENAMED_FROZEN = {"blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"}


def check(plan: dict, names: list[str], frozen: set[str]) -> None:
    assert set(plan["frozen"]) == frozen
    assert set(plan["trainable"]) == set(names) - frozen
    assert set(plan["frozen"]) <= set(names)  # every name the plan freezes is in the file
    assert plan["unmatched_prefixes"] == []
    assert plan["freeze"] == ["blocks.0", "blocks.1"]


def test_service_export_renames_the_freeze_prefixes(client, source: Path, tmp_path: Path) -> None:
    cid = upload(client, source).json()["id"]
    core = client.app.state.core
    row, plan = ops.export(core, cid, rename={"layers.": "blocks."}, freeze=["layers.0", "layers.1"])
    assert plan is not None
    got, names = written_plan(client, row.id, tmp_path)
    assert "embed_tokens.weight" in names and "blocks.2.weight" in names
    check(got, names, RENAMED_FROZEN)
    assert plan.to_json(with_snippet=False) == got


def test_rest_export_renames_the_freeze_prefixes(client, source: Path, tmp_path: Path) -> None:
    cid = upload(client, source).json()["id"]
    body = {"rename": {"layers.": "blocks."}, "freeze": ["layers.0.", "layers.1"], "format": "safetensors"}
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json=body)
    assert r.status_code == 201, r.text
    got, names = written_plan(client, r.json()["id"], tmp_path)
    check(got, names, RENAMED_FROZEN)
    assert r.json()["freeze_plan"]["frozen"] == got["frozen"]


def test_ui_export_renames_the_freeze_prefixes(client, source: Path, tmp_path: Path) -> None:
    """The UI exports the ticked modules and, with 'embed freeze plan', freezes those same ones."""
    cid = upload(client, source).json()["id"]
    form = {
        "module": ["embed_tokens", "layers.0", "layers.1"],
        "rename": "layers.=blocks.",
        "embed_freeze": "on",
        "format": "safetensors",
        "csrf_token": csrf_token(client),
    }
    r = client.post(f"/checkpoints/{cid}/export", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    new_id = r.headers["location"].split("/")[-1].split("?")[0]
    got, names = written_plan(client, new_id, tmp_path)
    assert set(names) == RENAMED_FROZEN | {"embed_tokens.weight"}
    assert set(got["frozen"]) == set(names) and got["trainable"] == []
    assert got["freeze"] == ["embed_tokens", "blocks.0", "blocks.1"]


def test_rest_refuses_a_prefix_the_renaming_splits(client, source: Path) -> None:
    """``layers`` with ``layers.0.=first.``: its tensors land under two names; the plan gets both.
    ``blocks.0`` (the new name, not a module of the source) cannot be planned: 422, no file."""
    cid = upload(client, source).json()["id"]
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"rename": {"layers.0.": "first."}, "freeze": ["layers"]})
    assert r.status_code == 201, r.text
    assert r.json()["freeze_plan"]["freeze"] == ["layers", "first"]
    assert set(r.json()["freeze_plan"]["frozen"]) == {
        f"{m}.{p}" for m in ("first", "layers.1", "layers.2") for p in ("weight", "bias")
    }
    before = client.get("/api/v1/checkpoints").json()["total"]
    r = client.post(
        f"/api/v1/checkpoints/{cid}/export", json={"rename": {"layers.": "blocks."}, "freeze": ["blocks.0"]}
    )
    assert r.status_code == 422, r.text
    assert "blocks.0" in r.json()["detail"]
    assert client.get("/api/v1/checkpoints").json()["total"] == before  # nothing written


def test_plan_prefixes_over_the_listing(source: Path) -> None:
    tensors = open_checkpoint(source).root_tensors()
    # a module holding a renamed one: both names
    _, plan = export_with_plan(tensors, [], [], {"layers.1.": "middle."}, ["layers"])
    assert plan is not None and plan.freeze == ["layers", "middle"]
    assert {n.split(".")[0] for n in plan.frozen} == {"layers", "middle"} and plan.unmatched_prefixes == []
    # stripping a prefix that covers only part of the file: "layers" would become "" (everything)
    with pytest.raises(Invalid, match="layers"):
        export_with_plan(tensors, [], [], {"layers.": ""}, ["layers"])
    # without renaming, the prefixes are as given
    _, plan = export_with_plan(tensors, [], [], {}, ["layers.0."])
    assert plan is not None and plan.freeze == ["layers.0"]
