"""Copy, freeze, export and diff (through the API), checked by loading the results into real nn.Modules."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes

from tests import factories as f
from tests.helpers import TwoPart, assert_state_equal, models, upload


def download_state_dict(client, checkpoint_id: str) -> dict[str, torch.Tensor]:
    r = client.get(f"/api/v1/checkpoints/{checkpoint_id}/download")
    assert r.status_code == 200, r.text
    if r.content[8:9] == b"{":
        return load_safetensors_bytes(r.content)
    return torch.load(io.BytesIO(r.content), weights_only=True)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_copy_one_module_like_load_state_dict(client, tmp_path, fmt):
    a, b = models()
    save = f.save_torch if fmt == "pt" else f.save_safetensors
    ida = upload(client, save(a.state_dict(), tmp_path / f"a.{fmt}")).json()["id"]
    idb = upload(client, save(b.state_dict(), tmp_path / f"b.{fmt}")).json()["id"]

    dry = client.post(
        "/api/v1/copy", json={"source": ida, "target": idb, "mapping": {"nn_same.": "nn_same."}, "dry_run": True}
    )
    assert dry.status_code == 200 and dry.json()["written"] is False
    assert dry.json()["report"]["ok"] and dry.json()["report"]["counts"]["copied"] == 9  # params + BN buffers
    assert client.get("/api/v1/checkpoints").json()["total"] == 2  # a dry run writes nothing

    r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": {"nn_same.": "nn_same."}})
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["written"] and result["checkpoint"]["format"] == ("torch-zip" if fmt == "pt" else "safetensors")
    assert result["checkpoint"]["origin"] == "copy"

    expected = copy.deepcopy(b)
    expected.nn_same.load_state_dict(a.nn_same.state_dict())  # what the user would do in torch
    got = download_state_dict(client, result["checkpoint"]["id"])
    assert_state_equal(got, expected.state_dict())
    model = TwoPart()
    model.load_state_dict(got)  # strict: the result is a complete state dict of the target
    for name, p in model.nn_same.state_dict().items():
        assert torch.equal(p, a.nn_same.state_dict()[name])
    for name, p in model.head.state_dict().items():
        assert torch.equal(p, b.head.state_dict()[name])
    detail = client.get(f"/api/v1/checkpoints/{result['checkpoint']['id']}").json()
    assert detail["provenance"]["mapping"] == {"nn_same": "nn_same"}
    assert detail["provenance"]["source"]["id"] == ida


def test_copy_with_prefix_mapping_and_ddp_strip(client, tmp_path):
    a, b = models()
    ddp = {f"module.{k}": v for k, v in a.nn_same.state_dict().items()}  # saved from a DDP wrapper
    target = {f"backbone.{k}": v for k, v in b.nn_same.state_dict().items()} | {
        f"head.{k}": v for k, v in b.head.state_dict().items()
    }
    ida = upload(client, f.save_torch(ddp, tmp_path / "ddp.pt")).json()["id"]
    idb = upload(client, f.save_torch(target, tmp_path / "target.pt")).json()["id"]
    r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": {"module.": "backbone."}})
    assert r.status_code == 201, r.text
    got = download_state_dict(client, r.json()["checkpoint"]["id"])
    for k, v in a.nn_same.state_dict().items():
        assert torch.equal(got[f"backbone.{k}"], v)
    assert torch.equal(got["head.weight"], b.head.weight)


def test_copy_report_matches_torch_strict_false(client, tmp_path):
    a, b = models()
    src = {k: v for k, v in a.nn_same.state_dict().items() if k != "3.bias"}  # a key the target lacks
    src["extra.weight"] = torch.zeros(3)  # a key the target does not have
    src["0.weight"] = torch.zeros(9, 4)  # wrong shape
    ida = upload(client, f.save_torch({f"nn_same.{k}": v for k, v in src.items()}, tmp_path / "a.pt")).json()["id"]
    idb = upload(client, f.save_torch(b.state_dict(), tmp_path / "b.pt")).json()["id"]

    body = {"source": ida, "target": idb, "mapping": {"nn_same": "nn_same"}}
    strict = client.post("/api/v1/copy", json=body)
    assert strict.status_code == 422 and strict.json()["code"] == "copy_mismatch"
    report = strict.json()["report"]
    assert not report["ok"]

    # torch's own report for the same load (shape mismatches raise even with strict=False)
    fits = {k: v for k, v in src.items() if k != "0.weight"}
    torch_result = copy.deepcopy(b).nn_same.load_state_dict(fits, strict=False)
    # torch lists 0.weight as missing because we had to drop it to get past the size error;
    # ckptscope reports it once, as a shape mismatch
    assert sorted(report["missing"]) == sorted(f"nn_same.{k}" for k in torch_result.missing_keys if k != "0.weight")
    assert report["missing"] == ["nn_same.3.bias"]
    assert [u["source"] for u in report["unexpected"]] == [f"nn_same.{k}" for k in torch_result.unexpected_keys]
    assert report["shape_mismatches"] == [
        {"source": "nn_same.0.weight", "target": "nn_same.0.weight", "source_shape": [9, 4], "target_shape": [8, 4]}
    ]
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(b).nn_same.load_state_dict(src, strict=False)

    loose = client.post("/api/v1/copy", json=body | {"strict": False})
    assert loose.status_code == 201, loose.text
    got = download_state_dict(client, loose.json()["checkpoint"]["id"])
    expected = copy.deepcopy(b)
    expected.nn_same.load_state_dict(fits, strict=False)
    assert_state_equal(got, expected.state_dict())


def test_copy_casts_to_the_target_dtype_and_reports_it(client, tmp_path):
    a, b = models()
    src = {k: v.bfloat16() if v.is_floating_point() else v for k, v in a.state_dict().items()}
    ida = upload(client, f.save_safetensors(src, tmp_path / "a.safetensors")).json()["id"]
    idb = upload(client, f.save_safetensors(b.state_dict(), tmp_path / "b.safetensors")).json()["id"]
    r = client.post("/api/v1/copy", json={"source": ida, "target": idb, "mapping": {"head": "head"}})
    assert r.status_code == 201, r.text
    changes = r.json()["report"]["dtype_changes"]
    assert {c["target"] for c in changes} == {"head.weight", "head.bias"}
    assert all(c == c | {"from": "bfloat16", "to": "float32"} for c in changes)
    got = download_state_dict(client, r.json()["checkpoint"]["id"])
    expected = copy.deepcopy(b)
    expected.head.load_state_dict({k[5:]: v for k, v in src.items() if k.startswith("head.")})
    assert_state_equal(got, expected.state_dict())


def test_copy_errors_are_clear(client, tmp_path):
    a, b = models()
    ida = upload(client, f.save_torch(a.state_dict(), tmp_path / "a.pt")).json()["id"]
    r = client.post("/api/v1/copy", json={"source": ida, "target": "nope", "mapping": {"head": "head"}})
    assert r.status_code == 404
    r = client.post("/api/v1/copy", json={"source": ida, "target": ida, "mapping": {}})
    assert r.status_code == 422 and "body.mapping" in r.json()["detail"] and "at least 1 item" in r.json()["detail"]
    r = client.post(
        "/api/v1/copy", json={"source": ida, "target": ida, "mapping": {"nn_same.0": "x", "nn_same.3": "x"}}
    )
    assert r.status_code == 422 and "both map to" in r.json()["detail"]


def test_freeze_plan_and_snippet_freeze_a_backbone(client, tmp_path):
    torch.manual_seed(3)
    model = f.SmallCNN()
    cid = upload(client, f.save_torch(model.state_dict(), tmp_path / "cnn.pt")).json()["id"]
    r = client.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json={"freeze": ["features."]})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["frozen"] == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
        "features.3.weight",
        "features.3.bias",
    ]
    assert plan["trainable"] == ["head.weight", "head.bias"]
    assert plan["buffers"] == ["features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"]
    frozen_n = sum(p.numel() for n, p in model.named_parameters() if n.startswith("features."))
    assert plan["frozen_params"] == frozen_n and plan["trainable_params"] == 170
    assert plan["trainable_fraction"] == pytest.approx(170 / (170 + frozen_n))

    namespace: dict = {}
    exec(plan["snippet"], namespace)  # the generated code, run as a training script would
    trainable = namespace["apply_freeze_plan"](model)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    optimizer.step()
    after = model.state_dict()
    for name in plan["frozen"]:
        assert torch.equal(after[name], before[name]), name
    for name in plan["trainable"]:
        assert not torch.equal(after[name], before[name]), name
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("features."))

    r = client.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json={"freeze": ["nothing_here"]})
    assert r.json()["unmatched_prefixes"] == ["nothing_here"]
    r = client.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json={"freeze": []})
    assert r.status_code == 422


def test_freeze_counts_tied_parameters_once():
    from ckptscope.formats.model import StorageRef, TensorInfo
    from ckptscope.services.operations import freeze_plan

    ref = StorageRef("/x", 0, 40, "0")
    tensors = [
        TensorInfo("embed.weight", "float32", (10,), (1,), 0, ref),
        TensorInfo("lm_head.weight", "float32", (10,), (1,), 0, ref, alias_of="embed.weight"),
    ]
    plan = freeze_plan(tensors, ["embed"])
    assert plan.frozen_params == 10 and plan.trainable_params == 0 and plan.tied == {"lm_head.weight": "embed.weight"}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_selection_rename_and_metadata(client, tmp_path, fmt):
    model = f.TinyTransformer(layers=3)
    sd = model.state_dict()
    sd["layers.0.linear1.weight_t"] = sd["layers.0.linear1.weight"].t()  # a non-contiguous view
    src = upload(client, f.save_torch(sd, tmp_path / "tiny.pt")).json()
    r = client.post(
        f"/api/v1/checkpoints/{src['id']}/export",
        json={
            "include": ["layers", "embed", "lm_head"],
            "exclude": ["layers.2"],
            "rename": {"layers": "blocks"},
            "format": fmt,
            "freeze": ["embed"],
        },
    )
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["origin"] == "export" and out["freeze_plan"]["frozen"] == ["embed.weight"]
    got = download_state_dict(client, out["id"])
    want = {
        ("blocks" + k[6:] if k.startswith("layers.") else k): v
        for k, v in sd.items()
        if not k.startswith(("layers.2.", "norm."))
    }
    if fmt == "safetensors":
        want.pop("lm_head.weight")  # tied to embed.weight: safetensors keeps one name
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # values bit-identical to the source
    assert set(got) == set(want)
    if fmt == "pt":
        assert got["lm_head.weight"].data_ptr() == got["embed.weight"].data_ptr()  # the tie survives
    meta = client.get(f"/api/v1/checkpoints/{out['id']}").json()["metadata"]
    key = (lambda k: f"__metadata__.{k}") if fmt == "safetensors" else (lambda k: k)
    assert meta[key("ckptscope.source_sha256")] == src["sha256"]
    assert json.loads(meta[key("ckptscope.selection")])["exclude"] == ["layers.2"]
    assert json.loads(meta[key("ckptscope.freeze_plan")])["frozen"] == ["embed.weight"]
    if fmt == "safetensors":
        assert json.loads(meta[key("ckptscope.tied")]) == {"lm_head.weight": "embed.weight"}


def test_export_errors(client, tmp_path):
    cid = upload(client, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()["id"]
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"include": ["nope"]})
    assert r.status_code == 422 and "matches no tensor" in r.json()["detail"]
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"format": "onnx"})
    assert r.status_code == 422
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"rename": {"features.0": "head"}})
    assert r.status_code == 422 and "both" in r.json()["detail"]


def test_diff_rolls_changes_up_the_tree(client, tmp_path):
    a, b = models()
    ida = upload(client, f.save_torch(a.state_dict(), tmp_path / "a.pt")).json()["id"]
    tuned = copy.deepcopy(a.state_dict())
    tuned["head.weight"] = tuned["head.weight"] + 0.5
    tuned.pop("head.bias")
    tuned["new.weight"] = torch.ones(2)
    tuned["nn_same.3.bias"] = torch.zeros(5)
    idb = upload(client, f.save_safetensors(tuned, tmp_path / "tuned.safetensors")).json()["id"]
    r = client.get("/api/v1/diff", params={"a": ida, "b": idb})
    assert r.status_code == 200, r.text
    d = r.json()
    rows = {row["name"]: row for row in d["tensors"]}
    assert rows["head.weight"]["status"] == "changed"
    assert rows["head.weight"]["max_abs_diff"] == pytest.approx(0.5, rel=1e-6)
    w = a.head.weight.detach().double()
    assert rows["head.weight"]["rel_l2"] == pytest.approx((0.5 * w.numel() ** 0.5) / w.norm().item(), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(w.flatten(), (w + 0.5).flatten(), dim=0).item()
    assert rows["head.weight"]["cosine"] == pytest.approx(cos, rel=1e-9)
    assert rows["head.bias"]["status"] == "only_a" and rows["new.weight"]["status"] == "only_b"
    assert rows["nn_same.3.bias"]["status"] == "shape_changed"
    assert rows["nn_same.0.weight"]["status"] == "identical" and rows["nn_same.0.weight"]["max_abs_diff"] == 0
    tree = {c["name"]: c for c in d["tree"]["children"]}
    assert tree["head"]["changed"] and tree["head"]["counts"]["changed"] == 1
    nn_same = {c["name"]: c for c in tree["nn_same"]["children"]}
    assert not nn_same["0"]["changed"] and nn_same["3"]["changed"]
    assert d["counts"]["only_b"] == 1


def test_download_of_a_sharded_set_needs_a_file_name(client, tmp_path):
    index = f.sharded_safetensors(tmp_path, f.cnn_state_dict(), shards=2)
    files = [("file", (p.name, p.read_bytes())) for p in [index, *sorted(tmp_path.glob("model-*.safetensors"))]]
    cid = client.post("/api/v1/checkpoints", files=files).json()["id"]
    r = client.get(f"/api/v1/checkpoints/{cid}/download")
    assert r.status_code == 422 and "choose one with ?file=" in r.json()["detail"]
    r = client.get(f"/api/v1/checkpoints/{cid}/download", params={"file": index.name})
    assert r.status_code == 200 and r.content == index.read_bytes()


@pytest.mark.slow
def test_export_streams_without_loading_the_file(tmp_path):
    """Exporting half of a 512 MiB file keeps resident memory far below the data size."""
    src = tmp_path / "big.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import torch; from safetensors.torch import save_file;"
                f"save_file({{'keep.w': torch.randn(64 << 20), 'drop.w': torch.randn(64 << 20)}}, {str(src)!r})"
            ),
        ],
        check=True,
    )
    out = tmp_path / "half.safetensors"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked pytest parent
    probe = (
        "import sys;"
        f"sys.argv = ['ckptscope', 'export', {str(src)!r}, '--include', 'keep', '-o', {str(out)!r}];"
        "from ckptscope.cli import main; main();"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    peak_kib = int(r.stdout.strip().splitlines()[-1])
    assert out.stat().st_size > 256 << 20
    assert peak_kib < 200 * 1024, f"export peaked at {peak_kib / 1024:.0f} MiB RSS: {r.stdout} {r.stderr}"
