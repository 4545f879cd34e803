"""The REST contract: the OpenAPI document describes what the server does.

schemathesis (every check) runs against a live uvicorn server holding real checkpoints (a
torch.save file and a safetensors file, uploaded first, so path parameters can be real ids and
tensor names) and must find nothing; the document itself is checked for what schemathesis does not
look at (named operation ids, descriptions and examples, one error schema, the bearer scheme), and
Swagger UI at /docs must load it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema_rs
import pytest
import torch

from tests import factories as f
from tests.helpers import database_env, make_client
from tests.servers import Server

TOKEN = "contract-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 10  # per operation and phase: the run stays well under a minute on two cores
DATA_DEPENDENT_422 = {"uploadCheckpoint", "checkCheckpoint", "exportCheckpoint", "copyModules"}
RUN_TIMEOUT_S = 110
NAMES = ["encoder.weight", "encoder.bias", "encoder.norm.running_mean", "head.weight"]


def state_dict() -> dict[str, torch.Tensor]:
    f.seeded(3)
    return {
        "encoder.weight": torch.randn(16, 8),
        "encoder.bias": torch.zeros(16),
        "encoder.norm.running_mean": torch.zeros(16),
        "head.weight": torch.randn(4, 16),
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server with a token and real checkpoints: (server, ids to read, ids to delete, job ids)."""
    root = tmp_path_factory.mktemp("contract")
    sd = state_dict()
    files = [f.save_torch(sd, root / "model.pt"), f.save_safetensors(sd, root / "model.safetensors")]
    srv = Server(root / "data", {"CKPTSCOPE_API_TOKEN": TOKEN, **database_env()})
    try:
        made = [_upload(srv, path) for path in files + files]  # the second pair is for deleteCheckpoint
        for body in made:
            _wait_stats(srv, body["id"])
        yield srv, [b["id"] for b in made[:2]], [b["id"] for b in made[2:]], [b["job_id"] for b in made]
    finally:
        srv.stop()


def _upload(srv: Server, path: Path) -> dict:
    headers = {**BEARER, "Content-Type": "application/octet-stream"}
    status, body = srv.request("POST", f"/api/v1/checkpoints?filename={path.name}", path.read_bytes(), headers)
    assert status == 201, (status, body)
    return body


def _wait_stats(srv: Server, checkpoint_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = srv.request("GET", f"/api/v1/checkpoints/{checkpoint_id}", headers=BEARER)
        if status == 200 and body["stats_state"] == "done":
            return
        time.sleep(0.05)
    raise AssertionError(f"stats of {checkpoint_id} did not finish")


def _toml(value: object) -> str:
    return json.dumps(value)  # JSON strings, numbers, arrays and booleans are TOML too


def schemathesis_config(base: str, ids: list[str], victims: list[str], jobs: list[str]) -> str:
    """schemathesis.toml: the bearer token, real ids and tensor names for the path parameters (most
    of the time; random values the rest), and the one status we add to the rejections of schema-
    violating requests: 413, a body over CKPTSCOPE_MAX_BODY_BYTES, which a schema cannot bound."""
    binding = {"checkpoints": 0.9, "tensors": 0.9, "jobs": 0.9}
    lines = [
        f"base-url = {_toml(base)}",
        "seed = 16",
        "workers = 2",
        "max-failures = 50",
        "[generation]",
        f"max-examples = {MAX_EXAMPLES}",
        "[phases.stateful]",
        "max-steps = 6",
        "[phases.stateful.generation]",
        "max-examples = 4",
        "[auth.openapi.bearerAuth]",
        f"bearer = {_toml(TOKEN)}",
        "[checks.negative_data_rejection]",
        "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]",
        "[dictionaries.checkpoints]",
        f"values = {_toml(ids)}",
        "[dictionaries.victims]",
        f"values = {_toml(victims)}",
        "[dictionaries.tensors]",
        f"values = {_toml(NAMES)}",
        "[dictionaries.jobs]",
        f"values = {_toml(jobs)}",
        "[parameters]",
        f'"path.checkpoint_id" = {{ dictionary = "checkpoints", probability = {binding["checkpoints"]} }}',
        f'"path.name" = {{ dictionary = "tensors", probability = {binding["tensors"]} }}',
        f'"path.job_id" = {{ dictionary = "jobs", probability = {binding["jobs"]} }}',
        '"query.a" = { dictionary = "checkpoints", probability = 0.9 }',
        '"query.b" = { dictionary = "checkpoints", probability = 0.9 }',
        '"body.source" = { dictionary = "checkpoints", probability = 0.9 }',
        '"body.target" = { dictionary = "checkpoints", probability = 0.9 }',
        '"body.baseline" = { dictionary = "checkpoints", probability = 0.5 }',
        "[[operations]]",
        'include-operation-id = "deleteCheckpoint"',
        "[operations.parameters]",
        '"path.checkpoint_id" = { dictionary = "victims", probability = 0.5 }',
        # Schema-valid requests these operations refuse for what the data holds, not for their
        # shape: bytes that are no checkpoint (`unknown_format`, `corrupt`), a selection that
        # matches no tensor, a rule that does not parse or needs a baseline. A 422 with its code is
        # their documented answer; every other operation must accept every schema-valid request.
        "[[operations]]",
        f"include-operation-id = {_toml(sorted(DATA_DEPENDENT_422))}",
        "[operations.checks.positive_data_acceptance]",
        "expected-statuses = [200, 201, 204, 304, 401, 403, 404, 409, 422, 429]",
    ]
    return "\n".join(lines) + "\n"


def test_schemathesis_finds_no_contract_violation(live, tmp_path):
    srv, ids, victims, jobs = live
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(srv.base, ids, victims, jobs))
    status, spec = srv.request("GET", "/openapi.json", headers=BEARER)  # the document needs the token too
    assert status == 200
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    st = Path(sys.executable).with_name("st")
    command = [
        str(st),
        "--config-file",
        str(config),
        "run",
        str(tmp_path / "openapi.json"),
        "--checks",
        "all",
        "--no-color",
        "--request-timeout",
        "60",
    ]  # no --max-time: with one, schemathesis repeats fuzzing until the time is spent
    env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"}
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - started
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-12000:]
    tested = re.search(r"Tested: (\d+)", report)
    assert tested and int(tested.group(1)) >= 20, report[-4000:]  # every operation was exercised
    assert "generated" in report and elapsed < RUN_TIMEOUT_S
    print(report[-3000:])  # the summary, for -s / a failing run's log
    assert srv.request("GET", "/readyz")[0] == 200  # and the server is still well


# --- the document ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    with make_client(tmp_path_factory.mktemp("doc") / "data") as client:
        r = client.get("/openapi.json")
        assert r.status_code == 200
        return r.json()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_operation_ids_are_named_and_unique(document):
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids)) >= 20
    for operation_id in ids:
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)+|[a-z]+", operation_id), operation_id
    assert {"listCheckpoints", "getCheckpoint", "uploadCheckpoint", "getTensor", "listTensors"} <= set(ids)


def test_every_operation_and_parameter_is_described_with_an_example(document):
    for path, method, operation in operations(document):
        where = f"{method.upper()} {path}"
        assert operation.get("description", "").strip(), where
        assert operation.get("summary"), where
        for parameter in operation.get("parameters", []):
            assert parameter.get("description"), (where, parameter["name"])
            assert "example" in parameter or "examples" in parameter, (where, parameter["name"])


def test_every_error_response_is_the_one_problem_schema(document):
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    problem = schemas["Problem"]
    assert {"type", "title", "status", "detail", "instance", "code"} <= set(problem["required"])
    for path, method, operation in operations(document):
        errors = {s: r for s, r in operation["responses"].items() if s == "default" or int(s) >= 400}
        assert "500" in errors, (method, path)
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in errors, (method, path)
        for status, response in errors.items():
            assert response["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }, (method, path, status)
            assert response["description"], (method, path, status)
        body = operation.get("requestBody", {}).get("content", {})
        if "application/json" in body:
            assert "bad_json" in errors["400"]["description"], (method, path)


def test_constraints_the_server_enforces_are_in_the_schema(document):
    params = {
        (path, p["name"]): p["schema"]
        for path, _, op in operations(document)
        for p in op.get("parameters", [])
        if "schema" in p
    }
    tensors = "/api/v1/checkpoints/{checkpoint_id}/tensors"
    from ckptscope.store.queries import SORTABLE

    assert params[(tensors, "sort")]["enum"] == list(SORTABLE)
    assert params[(tensors, "offset")]["minimum"] == 0 and params[(tensors, "offset")]["maximum"] > 0
    assert params[(tensors, "limit")]["minimum"] == 1 and params[(tensors, "limit")]["maximum"] == 5000
    assert params[(tensors, "prefix")]["maxLength"] == 4096
    listing = "/api/v1/checkpoints"
    assert params[(listing, "limit")]["minimum"] == 1 and params[(listing, "offset")]["minimum"] == 0
    schemas = document["components"]["schemas"]
    assert schemas["FreezeRequest"]["properties"]["freeze"]["minItems"] == 1
    assert schemas["CheckRequest"]["properties"]["rules"]["minItems"] == 1
    assert schemas["CopyRequest"]["properties"]["mapping"]["minProperties"] == 1
    assert schemas["CheckpointPatch"]["properties"]["name"]["maxLength"] == 200
    upload = document["paths"][listing]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["minItems"] == 1


def test_the_bearer_scheme_guards_everything_but_health(document):
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert document["security"] == [{"bearerAuth": []}]
    open_ops = {path for path, _, op in operations(document) if op.get("security") == []}
    assert open_ops == {"/healthz", "/readyz"}


def test_errors_are_the_documented_problem(tmp_path, document):
    """Validation errors (422), malformed bodies (400), unknown ids (404) and unknown routes all
    answer with a body the Problem schema accepts, `code` included."""
    schema = document["components"]["schemas"]["Problem"]
    with make_client(tmp_path / "data") as client:
        answers = [
            (client.get("/api/v1/checkpoints/x/tensors?limit=0"), 422, "validation"),
            (client.get("/api/v1/checkpoints/x/tensors?sort=nope"), 422, "validation"),
            (client.post("/api/v1/copy", content=b"{nope", headers={"content-type": "application/json"}), 400, None),
            (client.post("/api/v1/checkpoints/x/freeze-plan", json={"freeze": []}), 422, "validation"),
            (client.get("/api/v1/checkpoints/x"), 404, "not_found"),
            (client.get("/api/v1/nothing-here"), 404, "not_found"),
            (client.put("/api/v1/checkpoints"), 405, "method_not_allowed"),
        ]
        for response, status, code in answers:
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            jsonschema_rs.validate(schema, body)
            assert body["status"] == status and body["type"] == f"/problems/{body['code']}"
            if code:
                assert body["code"] == code
        errors = answers[0][0].json()["errors"]
        assert errors[0]["loc"] == ["query", "limit"] and errors[0]["msg"]


def test_docs_page_loads_the_document(live):
    """/docs is Swagger UI from our own static files (no CDN), pointed at /openapi.json; with a
    token set, its Authorize button has the bearer scheme to fill."""
    srv, *_ = live

    def get(path: str) -> tuple[int, str, str]:
        req = urllib.request.Request(srv.base + path, headers=BEARER)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode("utf-8", "replace")

    status, kind, page = get("/docs")
    assert status == 200 and kind.startswith("text/html")
    scripts = re.findall(r'<script src="([^"]+)"', page)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
    assert scripts and styles and all(s.startswith("/static/") for s in scripts + styles)  # self-hosted
    for asset in scripts + styles:
        assert get(asset)[0] == 200, asset
    init = next(get(s)[2] for s in scripts if "init" in s)
    assert 'url: "/openapi.json"' in init
    status, kind, raw = get("/openapi.json")
    spec = json.loads(raw)
    assert status == 200 and spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/api/v1/checkpoints/{checkpoint_id}/tensors/{name}"]["get"]["operationId"] == "getTensor"


@pytest.mark.e2e
def test_swagger_authorize_sends_the_bearer_token(live):
    """In a real browser: log in, open /docs, fill Authorize with the token, run listCheckpoints
    from the page; the request carries `Authorization: Bearer <token>` and gets 200."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    srv, *_ = live
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is required for the browser tests"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(srv.base + "/docs")  # a browser without a session is sent to the login form
            page.fill("input[name=token]", TOKEN)
            page.locator("form button[type=submit]").click()
            page.wait_for_url("**/docs")
            page.locator("button.authorize").first.click()
            page.locator(".auth-container input").first.fill(TOKEN)
            page.locator(".auth-btn-wrapper button.authorize").click()
            page.locator(".auth-btn-wrapper button.btn-done").click()
            operation = page.locator("#operations-checkpoints-listCheckpoints")
            operation.locator(".opblock-summary").click()
            operation.locator("button.try-out__btn").click()
            with page.expect_request(lambda r: "/api/v1/checkpoints" in r.url and r.method == "GET") as sent:
                operation.locator("button.execute").click()
            assert sent.value.headers.get("authorization") == f"Bearer {TOKEN}"
            expect(operation.locator(".live-responses-table tbody .response-col_status").first).to_have_text(
                "200", timeout=20000
            )
            assert errors == [], errors
        finally:
            browser.close()
