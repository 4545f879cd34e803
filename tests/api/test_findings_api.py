"""``GET /api/v1/checkpoints/{id}/findings``, ``init`` in the tensor JSON and the tree's roll-ups."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_client, upload, wait_stats
from tests.services.test_insights import EXPECTED, NAN, SCALED, ZEROED, broken_llama


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return broken_llama(tmp_path_factory.mktemp("llama"))


def _uploaded(client, path) -> str:
    r = upload(client, path)
    assert r.status_code == 201, r.text
    wait_stats(client, r.json()["id"])
    return r.json()["id"]


def test_findings_modules_and_thresholds(client, llama_file):
    cid = _uploaded(client, llama_file)
    r = client.get(f"/api/v1/checkpoints/{cid}/findings")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["root"] == "" and body["stats_state"] == "done"
    assert {(f["target"], f["rule"]) for f in body["findings"]} == EXPECTED
    nan = next(f for f in body["findings"] if f["target"] == NAN)
    assert (
        nan["severity"] == "error" and nan["level"] == "tensor" and nan["values"]["nan"] == 5 and nan["threshold"] == 0
    )
    assert body["modules"][""]["findings"] == {"info": 0, "warning": 2, "error": 1}
    assert body["modules"]["model.layers.3"]["findings"]["warning"] == 1
    root = body["modules"][""]
    assert root["layers"] > 0 and 0 <= root["untrained"] <= root["layers"]
    assert body["thresholds"]["spike_ratio"] == 20.0 and body["thresholds"]["min_siblings"] == 3
    # a second call (cached once the stats are done) answers the same
    assert client.get(f"/api/v1/checkpoints/{cid}/findings", params={"root": ""}).json() == body


def test_init_in_tensor_json_and_tree_rollups(client, llama_file):
    cid = _uploaded(client, llama_file)
    page = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"limit": 100}).json()
    by = {t["name"]: t for t in page["tensors"]}
    assert all(set(t["init"]) == {"verdict", "matches", "score"} for t in by.values())
    assert by["model.layers.0.mlp.up_proj.weight"]["init"]["verdict"] == "init"
    assert by[SCALED]["init"]["verdict"] != "init"
    one = client.get(f"/api/v1/checkpoints/{cid}/tensors/{ZEROED}").json()
    assert one["init"] == by[ZEROED]["init"]

    tree = client.get(f"/api/v1/checkpoints/{cid}/tree").json()["tree"]
    assert tree["findings"] == {"info": 0, "warning": 2, "error": 1} and tree["layers"] > 0
    sub = client.get(f"/api/v1/checkpoints/{cid}/tree", params={"path": "model.layers.2", "depth": 1}).json()["tree"]
    assert sub["findings"]["error"] == 1
    attn = next(c for c in sub["children"] if c["name"] == "self_attn")
    assert attn["findings"]["error"] == 1 and attn["children"] is None
    mlp = next(c for c in sub["children"] if c["name"] == "mlp")
    assert mlp["findings"] == {"info": 0, "warning": 0, "error": 0}


def test_unknown_ids_and_roots_are_problems(client, llama_file):
    r = client.get("/api/v1/checkpoints/nope/findings")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    cid = _uploaded(client, llama_file)
    r = client.get(f"/api/v1/checkpoints/{cid}/findings", params={"root": "nope"})
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_openapi_documents_findings(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/v1/checkpoints/{checkpoint_id}/findings"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FindingsOut")
    assert "404" in op["responses"]
    finding = spec["components"]["schemas"]["FindingOut"]["properties"]
    assert {"rule", "severity", "target", "level", "message", "values", "threshold"} <= set(finding)
    assert "init" in spec["components"]["schemas"]["TensorOut"]["properties"]


def test_thresholds_from_the_settings_file(tmp_path, llama_file):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"variance_exploding": 1000}))  # the 100x layer no longer explodes ...
    with make_client(tmp_path / "data", findings_thresholds=path) as client:
        cid = _uploaded(client, llama_file)
        body = client.get(f"/api/v1/checkpoints/{cid}/findings").json()
    assert body["thresholds"]["variance_exploding"] == 1000
    rules = {(f["target"], f["rule"]) for f in body["findings"]}
    assert (SCALED, "variance-exploding") not in rules and (SCALED, "norm-outlier") in rules  # ... its norm does


def test_a_bad_thresholds_file_is_refused_at_startup(tmp_path):
    from pydantic import ValidationError

    from ckptscope.config import Settings

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"spike": 3}))
    with pytest.raises(ValidationError, match="unknown findings threshold 'spike'"):
        Settings(data_dir=tmp_path, findings_thresholds=path)


def test_init_verdicts_are_judged_once_by_the_stats_job_and_read_back(client, llama_file, monkeypatch):
    """The API serves the verdicts the stats job stored: judging again per request (0.1-0.5 ms a
    tensor) would make a page of a big checkpoint slow."""
    cid = _uploaded(client, llama_file)
    before = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"limit": 100}).json()["tensors"]
    import ckptscope.insights.init_verdict as verdicts
    import ckptscope.services.insights as insights

    def no_judging(*args, **kwargs):
        raise AssertionError("judged again at read time")

    monkeypatch.setattr(insights, "verdict_for", no_judging)
    monkeypatch.setattr(verdicts, "init_verdict", no_judging)
    after = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"limit": 100}).json()["tensors"]
    assert [t["init"] for t in after] == [t["init"] for t in before]
    assert {t["init"]["verdict"] for t in after} >= {"init", "trained"}
