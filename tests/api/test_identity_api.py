"""Content identity over REST, the UI and the CLI: tensors and modules found by digest across the
catalogue, ``identical_elsewhere`` in the tensor detail, a diff that skips reading identical
tensors, and a copy read back and verified bit-exact (the seeds' "transfer nn_same from model1 to
model2")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptscope import cli
from ckptscope.insights.identity import module_digests
from ckptscope.stats.digest import tensor_digest
from tests import factories as f
from tests.helpers import csrf_token, models, upload, wait_stats

DIGEST = "xxh3-128:" + "0" * 32


def _uploaded(client, path: Path) -> str:
    r = upload(client, path)
    assert r.status_code == 201, r.text
    wait_stats(client, r.json()["id"])
    return r.json()["id"]


def _tensors(client, checkpoint_id: str) -> dict[str, dict]:
    page = client.get(f"/api/v1/checkpoints/{checkpoint_id}/tensors", params={"limit": 1000}).json()
    return {t["name"]: t for t in page["tensors"]}


@pytest.fixture
def pair(client, tmp_path):
    """A (safetensors) and B (torch zip): `shared` equal, `own` different, A's `blk.0` is B's `layers.3`."""
    torch.manual_seed(0)
    shared, blk_w, blk_b = torch.randn(8, 4), torch.randn(3, 3), torch.randn(3)
    a = {"shared": shared, "own": torch.randn(5), "blk.0.w": blk_w, "blk.0.b": blk_b}
    b = {"shared": shared.clone(), "own": torch.randn(5), "layers.3.w": blk_w.clone(), "layers.3.b": blk_b.clone()}
    ia = _uploaded(client, f.save_safetensors(a, tmp_path / "base.safetensors"))
    ib = _uploaded(client, f.save_torch(b, tmp_path / "tuned.pt"))
    return ia, ib


def test_tensors_and_modules_by_digest_across_the_catalogue(client, pair):
    ia, ib = pair
    ta, tb = _tensors(client, ia), _tensors(client, ib)
    digest = ta["shared"]["stats"]["digest"]
    assert digest == tb["shared"]["stats"]["digest"] and digest != tb["own"]["stats"]["digest"]
    body = client.get(f"/api/v1/tensors/by-digest/{digest}").json()
    assert body["total"] == 2
    assert [(i["checkpoint_id"], i["checkpoint_name"], i["name"], i["root"], i["numel"]) for i in body["items"]] == [
        (ia, "base.safetensors", "shared", "", 32),
        (ib, "tuned.pt", "shared", "", 32),
    ]
    assert {i["sha256"] for i in body["items"]} == {
        client.get(f"/api/v1/checkpoints/{c}").json()["sha256"] for c in pair
    }
    assert client.get(f"/api/v1/tensors/by-digest/{digest}", params={"limit": 1}).json()["total"] == 2
    assert len(client.get(f"/api/v1/tensors/by-digest/{digest}", params={"limit": 1}).json()["items"]) == 1

    # the module digest, as documented, of A's blk.0 finds B's layers.3 too
    module = module_digests((n, t["stats"]["digest"]) for n, t in ta.items())["blk.0"]
    assert module is not None
    found = client.get(f"/api/v1/modules/by-digest/{module}").json()
    assert [(i["checkpoint_id"], i["name"], i["tensor_count"]) for i in found["items"]] == [
        (ia, "blk.0", 2),
        (ib, "layers.3", 2),
    ]
    assert found["total"] == 2

    for kind in ("tensors", "modules"):
        unknown = client.get(f"/api/v1/{kind}/by-digest/{DIGEST}")
        assert unknown.status_code == 200 and unknown.json() == {"digest": DIGEST, "total": 0, "items": []}
        for bad in ("abc", DIGEST.upper(), DIGEST + "0", "sha256:" + "0" * 32):
            r = client.get(f"/api/v1/{kind}/by-digest/{bad}")
            assert r.status_code == 422, (bad, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/tensors/by-digest/{digest}" in paths and "/api/v1/modules/by-digest/{digest}" in paths
    detail = client.get("/openapi.json").json()["components"]["schemas"]["TensorDetailOut"]["properties"]
    assert "identical_elsewhere" in detail


def test_tensor_detail_lists_identical_tensors_elsewhere(client, pair, tmp_path):
    ia, ib = pair
    one = client.get(f"/api/v1/checkpoints/{ia}/tensors/shared").json()
    same = one["identical_elsewhere"]
    assert same["digest"] == one["stats"]["digest"] and same["count"] == 1
    assert [(i["checkpoint_id"], i["name"]) for i in same["items"]] == [(ib, "shared")]
    own = client.get(f"/api/v1/checkpoints/{ia}/tensors/own").json()["identical_elsewhere"]
    assert own["count"] == 0 and own["items"] == []
    # a nested root: the hit names the root to open it under
    nested = {"state_dict": {"model.shared": torch.load(tmp_path / "tuned.pt")["shared"]}, "epoch": 3}
    ic = _uploaded(client, f.save_torch(nested, tmp_path / "trainer.ckpt"))
    same = client.get(f"/api/v1/checkpoints/{ia}/tensors/shared").json()["identical_elsewhere"]
    assert same["count"] == 2
    assert {(i["checkpoint_id"], i["root"], i["name"]) for i in same["items"]} == {
        (ib, "", "shared"),
        (ic, "state_dict", "model.shared"),
    }
    # the UI partial: "identical to tuned.pt : shared", linked
    page = client.get(f"/checkpoints/{ia}", params={"tensor": "shared"}).text
    assert 'class="identical-list"' in page and ">tuned.pt</a>" in page
    assert f'href="/checkpoints/{ic}?root=state_dict&amp;tensor=model.shared">model.shared</a>' in page


def test_the_partial_renders_the_hits_with_links():
    from ckptscope.web.templating import env

    item = {"checkpoint_id": "c1", "checkpoint_name": "<base>.safetensors", "sha256": "ab" * 32, "root": ""}
    identical = {"digest": DIGEST, "count": 3, "items": [item | {"name": "model.embed_tokens.weight", "numel": 4}]}
    html = env.get_template("_identical.html").render(identical=identical)
    assert 'identical to <a href="/checkpoints/c1">&lt;base&gt;.safetensors</a>' in html
    assert 'href="/checkpoints/c1?root=&amp;tensor=model.embed_tokens.weight">model.embed_tokens.weight</a>' in html
    assert "and 2 more" in html and DIGEST in html
    assert env.get_template("_identical.html").render(identical=None).strip() == ""


def _corrupt(client, checkpoint_id: str, name: str) -> None:
    """Change a tensor's bytes in the stored blob (its catalogue stats and digest stay)."""
    core = client.app.state.core
    body = client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()
    tensor = client.get(f"/api/v1/checkpoints/{checkpoint_id}/tensors/{name}").json()
    path = core.blobs.path_for(body["files"][0]["sha256"])
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(tensor["data_offset"])
        fh.write(torch.full((4,), 7.0).numpy().tobytes())


def test_diff_reports_equal_digests_identical_without_reading_them(client, pair, monkeypatch):
    ia, ib = pair
    _corrupt(client, ib, "shared")  # were the diff to read `shared`, it would find it changed
    import ckptscope.stats.compare as compare

    reads: list[str] = []
    real = compare._logical_chunks

    def counted(stack, info):
        reads.append(info.name)
        return real(stack, info)

    monkeypatch.setattr(compare, "_logical_chunks", counted)
    result = client.get("/api/v1/diff", params={"a": ia, "b": ib}).json()
    rows = {r["name"]: r for r in result["tensors"]}
    assert rows["shared"]["status"] == "identical" and rows["shared"]["skipped_read"] is True
    assert rows["own"]["status"] == "changed" and "skipped_read" not in rows["own"]
    assert result["skipped_reads"] == 1 and reads == ["own", "own"]
    assert result["moved_modules"] == [{"a": "blk.0", "b": "layers.3"}]
    assert result["identical_modules"] == []  # `shared` is a tensor of the root; blk.0 is only in A

    same = client.get("/api/v1/diff", params={"a": ia, "b": ia}).json()
    assert same["skipped_reads"] == 4 and same["identical_modules"] == [""] and same["counts"]["identical"] == 4


def _seed_models(tmp_path: Path) -> tuple[Path, Path]:
    model1, model2 = models()
    return (
        f.save_torch(model1.state_dict(), tmp_path / "model1.pt"),
        f.save_safetensors(model2.state_dict(), tmp_path / "model2.safetensors"),
    )


def test_copy_is_read_back_and_the_target_module_is_identical_to_the_source(client, tmp_path):
    p1, p2 = _seed_models(tmp_path)
    m1, m2 = _uploaded(client, p1), _uploaded(client, p2)
    r = client.post("/api/v1/copy", json={"source": m1, "target": m2, "mapping": {"nn_same": "nn_same"}})
    assert r.status_code == 201, r.text
    verified = r.json()["report"]["verified"]
    names = [n for n in torch.load(p1) if n.startswith("nn_same.")]
    assert verified["ok"] and sorted(verified["identical"]) == sorted(names) and verified["mismatched"] == []
    assert [(m["source"], m["target"], m["identical"]) for m in verified["modules"]] == [("nn_same", "nn_same", True)]
    new = r.json()["checkpoint"]["id"]
    wait_stats(client, new)
    # the new checkpoint's nn_same has model1's module digest; its head keeps model2's
    module = verified["modules"][0]["source_digest"]
    hits = client.get(f"/api/v1/modules/by-digest/{module}").json()["items"]
    assert {(i["checkpoint_id"], i["name"]) for i in hits} == {(m1, "nn_same"), (new, "nn_same")}
    diff = client.get("/api/v1/diff", params={"a": m1, "b": new}).json()
    assert diff["identical_modules"] == ["nn_same"] and diff["skipped_reads"] == len(names)
    # the UI's copy result (the page of the written checkpoint, right after the copy)
    client.cookies.set("ckptscope_created", new)
    page = client.get(f"/checkpoints/{new}").text
    assert "Verified bit-exact: 9 copied tensors" in page and "nn_same is now identical to model1.pt" in page


def test_a_cast_copy_verifies_the_cast_values_and_says_the_module_differs(client, tmp_path):
    p1, _ = _seed_models(tmp_path)
    _, model2 = models()
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model2.state_dict().items()}
    m1, m2 = _uploaded(client, p1), _uploaded(client, f.save_safetensors(half, tmp_path / "half.safetensors"))
    r = client.post("/api/v1/copy", json={"source": m1, "target": m2, "mapping": {"nn_same": "nn_same"}})
    assert r.status_code == 201, r.text
    verified = r.json()["report"]["verified"]
    assert verified["ok"] and verified["counts"]["identical"] == 9
    assert verified["modules"][0]["identical"] is False  # bf16 values are not model1's float32 ones


def test_a_copy_whose_written_bytes_differ_fails_and_keeps_nothing(client, tmp_path, monkeypatch):
    import ckptscope.services.catalogue_ops as ops

    p1, p2 = _seed_models(tmp_path)
    m1, m2 = _uploaded(client, p1), _uploaded(client, p2)
    real = ops.write_checkpoint

    def corrupting(path, outputs, fmt, metadata):
        real(path, outputs, fmt, metadata)
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        entry = json.loads(data[8:header])["nn_same.3.bias"]
        data[header + entry["data_offsets"][0]] ^= 0x01  # one bit of one copied tensor
        path.write_bytes(bytes(data))

    monkeypatch.setattr(ops, "write_checkpoint", corrupting)
    before = client.get("/api/v1/checkpoints").json()["total"]
    r = client.post("/api/v1/copy", json={"source": m1, "target": m2, "mapping": {"nn_same": "nn_same"}})
    assert r.status_code == 422 and r.json()["code"] == "copy_not_verified", r.text
    assert "nn_same.3.bias" in r.json()["detail"]
    verified = r.json()["verified"]
    assert not verified["ok"] and [m["target"] for m in verified["mismatched"]] == ["nn_same.3.bias"]
    assert verified["counts"]["identical"] == 8 and verified["modules"][0]["identical"] is False
    assert client.get("/api/v1/checkpoints").json()["total"] == before
    # the UI says so too
    r = client.post(
        f"/checkpoints/{m1}/copy",
        data={"module": "nn_same", "target": m2, "strict": "1", "action": "copy"},
        headers={"X-CSRF-Token": csrf_token(client)},
    )
    assert r.status_code == 422 and "copy verification failed" in r.text


def test_cli_copy_reports_verification_and_fails_on_a_mismatch(tmp_path, monkeypatch, capsys):
    import ckptscope.services.operations as operations

    p1, p2 = _seed_models(tmp_path)
    out = tmp_path / "model2.copy.safetensors"
    assert cli.main(["copy", str(p1), str(p2), "--map", "nn_same=nn_same", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verified bit-exact: 9 copied tensors" in text
    assert "module: target nn_same is now identical to source nn_same" in text
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["nn_same.0.weight"], torch.load(p1)["nn_same.0.weight"])
    assert cli.main(["copy", str(p1), str(p2), "--map", "nn_same=nn_same", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["verified"]["ok"] and report["verified"]["counts"]["identical"] == 9

    real = operations.write_checkpoint

    def corrupting(path, outputs, fmt, metadata):
        real(path, outputs, fmt, metadata)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # the last byte of the last tensor's data
        path.write_bytes(bytes(data))

    monkeypatch.setattr(operations, "write_checkpoint", corrupting)
    bad = tmp_path / "bad.safetensors"
    assert cli.main(["copy", str(p1), str(p2), "--map", "nn_same=nn_same", "-o", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "VERIFICATION FAILED: 1 written tensors differ" in captured.out
    assert "copy verification failed" in captured.err and not bad.exists()
    assert not list(tmp_path.glob(".bad.safetensors.*"))  # no temporary file left


def test_cli_diff_shows_identical_modules(tmp_path, capsys):
    p1, _ = _seed_models(tmp_path)
    sd = torch.load(p1)
    sd["head.weight"] = sd["head.weight"] + 1
    p3 = f.save_torch(sd, tmp_path / "other.pt")
    assert cli.main(["diff", str(p1), str(p3)]) == 1  # they differ (head.weight)
    text = capsys.readouterr().out
    assert "identical modules (1): nn_same" in text and "changed  head.weight" in text
    assert cli.main(["diff", str(p1), str(p3), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["identical_modules"] == ["nn_same"] and result["skipped_reads"] == 0  # no digests in a file diff


def test_the_stats_pass_digest_matches_the_one_computed_outside_it(client, pair):
    ia, _ = pair
    core = client.app.state.core
    _, content = core.queries.get_checkpoint(ia)
    for info, stats in core.queries.all_tensors(content):
        assert stats is not None and stats.digest == tensor_digest(info)


def test_the_tree_gives_each_module_its_digest(client, pair, tmp_path):
    ia, ib = pair
    ta = _tensors(client, ia)
    want = module_digests((n, t["stats"]["digest"]) for n, t in ta.items())
    tree = client.get(f"/api/v1/checkpoints/{ia}/tree").json()["tree"]
    assert tree["digest"] == want[""]
    blk = next(c for c in tree["children"] if c["name"] == "blk")
    assert blk["digest"] == want["blk"] and blk["children"][0]["digest"] == want["blk.0"]
    assert all(c["digest"] is None for c in blk["children"][0]["children"])  # tensors: their digest is in stats
    sub = client.get(f"/api/v1/checkpoints/{ib}/tree", params={"path": "layers.3"}).json()["tree"]
    assert sub["digest"] == want["blk.0"]  # the same module under another name
    # under a nested root, paths are relative to it and the digests are the same modules'
    nested = {"state_dict": {"blk.0.w": torch.load(tmp_path / "tuned.pt")["layers.3.w"]}, "epoch": 1}
    nested["state_dict"]["blk.0.b"] = torch.load(tmp_path / "tuned.pt")["layers.3.b"]
    ic = _uploaded(client, f.save_torch(nested, tmp_path / "trainer.ckpt"))
    tree = client.get(f"/api/v1/checkpoints/{ic}/tree", params={"root": "state_dict"}).json()["tree"]
    assert tree["children"][0]["children"][0]["digest"] == want["blk.0"]
    hits = client.get(f"/api/v1/modules/by-digest/{want['blk.0']}").json()["items"]
    assert {(i["checkpoint_id"], i["root"], i["name"]) for i in hits} == {
        (ia, "", "blk.0"),
        (ib, "", "layers.3"),
        (ic, "state_dict", "blk.0"),
    }


def test_the_compare_page_shows_identity(client, pair):
    ia, ib = pair
    page = client.get("/compare", params={"a": ia, "b": ib}).text
    assert "1 identical tensors known by their digests (not read)" in page
    assert 'A <span class="mono">blk.0</span> = B <span class="mono">layers.3</span>' in page
    same = client.get("/compare", params={"a": ia, "b": ia}).text
    assert 'Identical modules: <span class="mono">(whole checkpoint)</span>' in same
