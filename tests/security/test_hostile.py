"""The adversarial corpus: no code runs, every case gets its documented answer, nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ckptscope.formats import CheckpointError, open_checkpoint
from tests.helpers import ROOT, database_env
from tests.hostile_corpus import Case, build_corpus, positive_control
from tests.servers import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[Case]]:
    out = tmp_path_factory.mktemp("corpus")
    canaries = tmp_path_factory.mktemp("canaries")
    return out, canaries, build_corpus(out, canaries)


def canaries_present(canaries: Path) -> list[str]:
    return sorted(p.name for p in canaries.iterdir())


def test_corpus_size_and_categories(corpus):
    _, _, cases = corpus
    assert len(cases) >= 250
    categories = {c.category for c in cases}
    assert categories == {
        "pickle code execution",
        "zip tricks",
        "safetensors header",
        "resource abuse",
        "sharded index",
        "hostile names",
        "truncated and random",
        "pickle machine",
        "text and numbers",
        "payloads in sharded sets",
    }
    assert len({c.name for c in cases}) == len(cases)
    assert [c.name for c in cases if c.expect == "rejected" and not c.code] == []  # every answer exact


def test_positive_control_every_payload_is_live(corpus, tmp_path):
    """Under plain pickle each code payload really runs: the corpus tests something."""
    out, canaries, cases = corpus
    raw = [c for c in cases if c.runs_code and c.name.endswith("_raw")]
    assert len(raw) >= 12
    positive_control(out, cases)
    deadline = time.monotonic() + 10
    expected = sorted(c.name.removeprefix("pickle_").removesuffix("_raw") for c in raw)
    while canaries_present(canaries) != expected and time.monotonic() < deadline:
        time.sleep(0.1)  # subprocess.Popen payloads finish in the background
    assert canaries_present(canaries) == expected
    for p in canaries.iterdir():
        p.unlink()


def _primary(out: Path, case: Case) -> Path:
    if len(case.files) == 1:
        return out / case.files[0]
    return next(out / f for f in case.files if f.endswith(".json"))


def test_every_case_in_process(corpus):
    """The readers themselves (no sandbox): only CheckpointError, the expected code, no canary."""
    out, canaries, cases = corpus
    wrong = []
    for case in cases:
        if case.code == "unlisted_file":
            continue  # a server-side rule (files of one upload), not a reader rule
        try:
            open_checkpoint(_primary(out, case))
            outcome, code = "accepted", None
        except CheckpointError as exc:
            outcome, code = "rejected", exc.code
        if case.code == "bad_name":  # refused by the catalogue, not by the reader
            outcome, code = "rejected", "bad_name"
        if outcome != case.expect or (case.code and code != case.code):
            wrong.append((case.name, outcome, code))
    assert wrong == []
    assert canaries_present(canaries) == []


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("hostile-server") / "data"
    srv = Server(data, {"CKPTSCOPE_PARSE_MEMORY_BYTES": str(1536 * 1024**2), **database_env()})
    yield srv
    assert srv.terminate()


def test_every_case_through_the_server(corpus, live_server):
    out, canaries, cases = corpus
    base, data, proc = live_server.base, live_server.data_dir, live_server.proc
    client = httpx.Client(base_url=base, timeout=180)
    from tests import factories as f

    # warm up: the first stats job imports torch (~200 MiB, once); measure growth after that
    warm = f.save_torch(f.cnn_state_dict(), out / "warm.pt")
    warm_id = client.post("/api/v1/checkpoints", files={"file": ("warm.pt", warm.read_bytes())}).json()["id"]
    for _ in range(100):
        if client.get(f"/api/v1/checkpoints/{warm_id}").json()["stats_state"] == "done":
            break
        time.sleep(0.1)
    baseline = _rss_kib(proc.pid)
    accepted: dict[str, str] = {}
    failures = []

    def blob_count() -> int:
        return sum(1 for p in (data / "blobs").rglob("*") if p.is_file())

    for case in cases:
        blobs_before = blob_count()
        name = "../../<img src=x onerror=alert(1)>\u202e.pt" if case.name == "names_client_filename" else None
        files = [("file", (name or Path(f).name, (out / f).read_bytes())) for f in case.files]
        r = client.post("/api/v1/checkpoints", files=files)
        if r.status_code >= 500:
            failures.append((case.name, r.status_code, r.text[:200]))
            continue
        if case.expect == "accepted":
            if r.status_code != 201:
                failures.append((case.name, r.status_code, r.text[:200]))
                continue
            accepted[case.name] = cid = r.json()["id"]
            for view in (
                f"/api/v1/checkpoints/{cid}",
                f"/api/v1/checkpoints/{cid}/tensors?limit=20",
                f"/api/v1/checkpoints/{cid}/tree?depth=2",
                f"/checkpoints/{cid}",
            ):  # every view of an accepted file answers
                shown = client.get(view)
                if shown.status_code != 200:
                    failures.append((case.name, view, shown.status_code, shown.text[:200]))
            continue
        problem = r.json()
        if not (400 <= r.status_code < 500) or r.headers["content-type"] != "application/problem+json":
            failures.append((case.name, r.status_code, r.text[:200]))
        elif problem.get("code") != case.code:
            failures.append((case.name, problem.get("code"), problem["detail"][:200]))
        elif "Traceback" in problem["detail"] or "Error:" in problem["detail"]:
            failures.append((case.name, "python text in the detail", problem["detail"][:200]))
        left = [*(data / "tmp").iterdir(), *(data / "pins").glob("*")]
        if left or blob_count() != blobs_before:  # a refusal leaves nothing: no temp file, pin or blob
            failures.append((case.name, "left behind", [p.name for p in left], blob_count(), blobs_before))
    assert failures == []
    assert canaries_present(canaries) == []
    grown_mib = (_rss_kib(proc.pid) - baseline) / 1024
    assert grown_mib < 150, f"server RSS grew by {grown_mib:.0f} MiB over the corpus"

    # nothing half-written: temp files gone, one catalogue row per accepted case, blobs only for them
    assert list((data / "tmp").iterdir()) == []
    listed = [c for c in client.get("/api/v1/checkpoints?limit=1000").json()["items"] if c["id"] != warm_id]
    assert sorted(c["id"] for c in listed) == sorted(accepted.values())
    blob_count = len([p for p in (data / "blobs").rglob("*") if p.is_file()])
    assert blob_count == len({c["sha256"] for c in listed}) + 1  # + the warm-up file

    # hostile text comes back verbatim as data, and the client's file name is display text only
    names = client.get(f"/api/v1/checkpoints/{accepted['names_safetensors']}/tensors", params={"limit": 50}).json()
    assert "<img src=x onerror=alert(1)>" in {t["name"] for t in names["tensors"]}
    assert "\u202eexe.txt" in {t["name"] for t in names["tensors"]}
    shown = client.get(f"/api/v1/checkpoints/{accepted['names_client_filename']}").json()["name"]
    assert "/" not in shown and shown.endswith(".pt")
    page = client.get(f"/checkpoints/{accepted['names_safetensors']}").text
    assert "<img src=x onerror" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "\u202e" not in page and "\\u202e" in page

    # and the service still works normally afterwards
    good = f.save_torch(f.cnn_state_dict(), out / "after.pt")
    r = client.post("/api/v1/checkpoints", files={"file": ("after.pt", good.read_bytes())})
    assert r.status_code == 201
    assert r.json()["tensor_count"] == 11
    log = live_server.log()
    assert "Traceback" not in log, log[-2000:]


def test_corpus_script_runs_standalone(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tests.hostile_corpus", str(tmp_path / "c")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["cases"] >= 250
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())[0]["expect"] in ("rejected", "accepted")
