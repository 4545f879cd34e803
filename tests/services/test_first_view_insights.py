"""Issue 18, the first view after a start: the insights of a stored checkpoint are read in one pass
over its catalogue rows (no histogram decoded, no listing records) and must equal ``analyse`` of
the full records; concurrent first requests compute the insights and the tree once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from ckptscope.formats.model import module_types_under
from ckptscope.services import checkpoints as svc
from ckptscope.services import insights as ins
from ckptscope.stats.tree import TreeCache
from ckptscope.store.catalogue import TensorRow
from tests.helpers import make_client, upload, wait_stats
from tests.services.test_insights import EXPECTED, broken_llama


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory) -> Path:
    return broken_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def stored(tmp_path, llama_file):
    """A client whose catalogue holds the broken Llama with its stats done, and its checkpoint id."""
    with make_client(tmp_path / "data") as client:
        cid = upload(client, llama_file).json()["id"]
        assert wait_stats(client, cid)["stats_state"] == "done"
        yield client, cid


def _reference(core, content, root: str) -> ins.Insights:
    """``analyse`` of the full records, as the insights were computed before issue 18."""
    pairs = svc.all_tensors(core, content, root)
    types = module_types_under(content.module_types or {}, root)
    return ins.analyse(pairs, ins.thresholds_of(core.settings), module_types=types)


def _assert_same(got: ins.Insights, want: ins.Insights) -> None:
    assert got.to_json() == want.to_json()
    assert got.findings == want.findings
    assert list(got.init.items()) == list(want.init.items())  # every tensor, in file order
    assert got.modules == want.modules


def test_catalogue_insights_equal_analyse_of_the_records(stored):
    client, cid = stored
    core = client.app.state.core
    _, content = svc.get_checkpoint(core, cid)
    root = svc.check_root(content, None)
    want = _reference(core, content, root)
    assert {(f.target, f.rule) for f in want.findings} >= EXPECTED  # the file has findings to compare
    assert any(v.verdict != "unknown" for v in want.init.values())
    _assert_same(ins._catalogue_insights(core, content, root, ins.thresholds_of(core.settings)), want)
    # what the REST API serves is the same
    body = client.get(f"/api/v1/checkpoints/{cid}/findings").json()
    assert body["findings"] == want.to_json()["findings"] and body["modules"] == want.to_json()["modules"]


def test_rows_without_a_stored_verdict_or_stats_are_judged_as_analyse_judges(stored):
    """Older stats (no stored init verdict) and tensors without stats take the full records."""
    client, cid = stored
    core = client.app.state.core
    _, content = svc.get_checkpoint(core, cid)
    names = [t.name for t, _ in svc.all_tensors(core, content, "")]
    with core.catalogue.session() as session, session.begin():
        where = (TensorRow.content_key == content.key) & TensorRow.name.in_(names[::3])
        session.execute(update(TensorRow).where(where).values(init=None))
        session.execute(update(TensorRow).where(TensorRow.name == names[1]).values(hist=None))
    want = _reference(core, content, "")
    assert want.init[names[1]].verdict == "unknown"
    _assert_same(ins._catalogue_insights(core, content, "", ins.thresholds_of(core.settings)), want)


@pytest.mark.parametrize(
    "hist",
    [
        {"bins": [1, 2], "min": 0.0, "max": 1.0, "note": None, "percentiles": {"0.1": -0.5, "99.9": 0.5}, "log": None},
        {"bins": [], "min": None, "max": None, "note": 'a "percentiles": note', "percentiles": None},
        {"bins": [0], "min": 0.0, "max": 0.0, "note": None},
        {"note": '\\"percentiles\\":{}', "percentiles": {"50": 1e-300, "1": float("nan")}, "bins": [3]},
    ],
)
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": "), (",", " : ")])
def test_percentiles_are_read_out_of_the_histogram_text(hist, separators):
    text = json.dumps(hist, separators=separators)
    got, want = ins._percentiles(text), json.loads(text).get("percentiles")
    assert json.dumps(got) == json.dumps(want)


def test_single_flight_runs_overlapping_calls_once():
    flight: ins.SingleFlight[object] = ins.SingleFlight()
    calls = 0
    gate = threading.Event()

    def compute() -> object:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return object()

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(flight.run("k", compute))) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not flight.running("k") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the others are waiting on the first
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == 1 and len(results) == 6 and len({id(r) for r in results}) == 1
    assert not flight.running("k")
    flight.run("k", compute)  # over: a later call computes again
    assert calls == 2


def test_single_flight_gives_the_error_to_every_waiter():
    flight: ins.SingleFlight[int] = ins.SingleFlight()
    gate = threading.Event()

    def fail() -> int:
        gate.wait(5)
        raise ValueError("boom")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            flight.run("k", fail)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 4
    assert flight.run("k", lambda: 3) == 3


def test_concurrent_first_requests_compute_the_tree_and_insights_once(stored, monkeypatch):
    client, cid = stored
    core = client.app.state.core
    _, content = svc.get_checkpoint(core, cid)
    monkeypatch.setattr(core, "trees", TreeCache())  # as after a start: nothing built
    monkeypatch.setattr(ins, "_cache", ins._Cache())
    counts = {"tree": 0, "insights": 0}
    tree_inputs, catalogue_insights = core.queries.tree_inputs, ins._catalogue_insights

    def slow_tree_inputs(*args, **kwargs):
        counts["tree"] += 1
        time.sleep(0.3)
        return tree_inputs(*args, **kwargs)

    def slow_insights(*args, **kwargs):
        counts["insights"] += 1
        time.sleep(0.3)
        return catalogue_insights(*args, **kwargs)

    monkeypatch.setattr(core.queries, "tree_inputs", slow_tree_inputs)
    monkeypatch.setattr(ins, "_catalogue_insights", slow_insights)
    got: list[tuple[object, object]] = []

    def view() -> None:
        got.append((svc.module_tree(core, content, ""), ins.checkpoint_insights(core, content, "")))

    threads = [threading.Thread(target=view) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert counts == {"tree": 1, "insights": 1}
    assert len({id(tree) for tree, _ in got}) == 1 and len({id(found) for _, found in got}) == 1
    assert svc.built_module_tree(core, content, "") is got[0][0]
    assert ins.cached_insights(core, content, "") is got[0][1]
