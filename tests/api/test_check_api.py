"""``POST /api/v1/checkpoints/{id}/check``: the CI gate over REST, on a real catalogue."""

from __future__ import annotations

import pytest
import torch

from tests import factories as f
from tests.helpers import make_client, upload, wait_stats


def _uploaded(client, path) -> str:
    r = upload(client, path)
    assert r.status_code == 201, r.text
    wait_stats(client, r.json()["id"])
    return r.json()["id"]


def _pair(client, tmp_path) -> tuple[str, str]:
    torch.manual_seed(0)
    base = {"embed.weight": torch.randn(8, 4), "layers.0.w": torch.randn(4, 4), "layers.1.w": torch.randn(4, 4)}
    tuned = dict(base)
    tuned["layers.1.w"] = base["layers.1.w"] + 1
    tuned["layers.1.b"] = torch.tensor([1.0, float("nan")])  # added, with a NaN
    a = _uploaded(client, f.save_safetensors(base, tmp_path / "base.safetensors"))
    b = _uploaded(client, f.save_safetensors(tuned, tmp_path / "tuned.safetensors"))
    return a, b


def check(client, checkpoint_id: str, rules: list[str], **body):
    return client.post(f"/api/v1/checkpoints/{checkpoint_id}/check", json={"rules": rules, **body})


def test_rules_pass_and_fail_with_offenders(client, tmp_path):
    base, tuned = _pair(client, tmp_path)
    r = check(client, tuned, ["changed-only=layers.1", "unchanged=embed,layers.0", "params==66"], baseline=base)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["passed"] is True and [x["passed"] for x in body["results"]] == [True, True, True]

    r = check(client, tuned, ["changed-only=layers.0", "no-nan", "max-abs<=100", "dtype==bf16@embed"], baseline=base)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["passed"] is False
    by = {x["rule"]: x for x in body["results"]}
    assert set(by["changed-only=layers.0"]["offenders"]) == {"layers.1.w", "layers.1.b (added)"}
    assert by["changed-only=layers.0"]["offender_count"] == 2
    assert by["no-nan"]["offenders"] == ["layers.1.b"] and not by["no-nan"]["passed"]
    assert by["max-abs<=100"]["passed"] is True
    assert by["dtype==bf16@embed"]["offenders"] == ["embed.weight"]
    assert set(by["no-nan"]) == {"rule", "passed", "detail", "offenders", "offender_count"}


def test_findings_and_untrained_rules_run_over_rest(client, tmp_path):
    path = f.save_safetensors({"a.weight": torch.tensor([1.0, float("nan")] * 8)}, tmp_path / "nan.safetensors")
    checkpoint = _uploaded(client, path)
    r = check(client, checkpoint, ["no-findings>=error", "no-untrained"])
    assert r.status_code == 200, r.text
    by = {x["rule"]: x for x in r.json()["results"]}
    assert by["no-findings>=error"]["passed"] is False and by["no-findings>=error"]["offenders"] == ["a.weight"]
    assert isinstance(by["no-untrained"]["passed"], bool)


def test_malformed_rules_unknown_ids_and_missing_baseline_are_problems(client, tmp_path):
    base, tuned = _pair(client, tmp_path)
    r = check(client, tuned, ["no-nan", "max-abs<=lots"])
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "bad_rule" and "max-abs<=lots" in r.json()["detail"]
    r = check(client, tuned, ["unchanged=embed"])
    assert r.status_code == 422 and "baseline" in r.json()["detail"]
    assert check(client, tuned, []).status_code == 422
    assert check(client, "nope", ["no-nan"]).status_code == 404
    r = check(client, tuned, ["unchanged=embed"], baseline="nope")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert check(client, tuned, ["no-nan"], root="no.such.root").status_code == 404


def test_pending_stats_are_a_409(data_dir, tmp_path, monkeypatch):
    from ckptscope.jobs.runner import JobRunner

    monkeypatch.setattr(JobRunner, "_run_stats", lambda self, job_id, key: None)
    with make_client(data_dir) as client:
        body = upload(client, f.save_safetensors({"a.w": torch.ones(3)}, tmp_path / "a.safetensors")).json()
        r = check(client, body["id"], ["no-nan"])
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "stats_pending" and "not computed yet" in r.json()["detail"]


def test_openapi_documents_the_check(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/v1/checkpoints/{checkpoint_id}/check"]["post"]
    assert {"404", "409", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert {"rules", "baseline", "root"} <= set(schemas["CheckRequest"]["properties"])
    assert {"passed", "results"} <= set(schemas["CheckResult"]["properties"])
    assert {"rule", "passed", "detail", "offenders", "offender_count"} <= set(schemas["RuleResultOut"]["properties"])


@pytest.mark.parametrize("rules", [["x" * 5000], ["no-nan"] * 1001])
def test_bounded_requests(client, rules):
    assert check(client, "any", rules).status_code == 422
