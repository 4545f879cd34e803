"""Issue 18, the first view of a big checkpoint after a start: the page does not wait for its module
tree and insights (built once, after the page is sent); it shows a loading state and loads the
tree, its badges and the header's facts right after, the same as a page that had them. Small
checkpoints are rendered whole as before. ``routes.INLINE_TREE_TENSORS`` is set to 0 here so that
a small file takes the big one's path."""

from __future__ import annotations

import html
import re
import threading
import time

import httpx
import pytest
import uvicorn
from playwright.sync_api import expect

from ckptscope.config import Settings
from ckptscope.main import create_app
from ckptscope.services import insights as ins
from ckptscope.stats.tree import TreeCache
from ckptscope.web import routes
from tests import factories as f
from tests.helpers import make_client, upload, wait_stats
from tests.servers import free_port
from tests.web.test_insights_ui import INIT_LAYER, NAN_LAYER, SCALED_LAYER, tensors


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return f.save_safetensors(tensors(), tmp_path_factory.mktemp("first-view") / "model.safetensors")


@pytest.fixture
def stored(tmp_path, model_file, monkeypatch):
    """A client on a catalogue holding the model (stats done), as a server just started: no tree
    built, no insights kept."""
    with make_client(tmp_path / "data") as client:
        cid = upload(client, model_file).json()["id"]
        assert wait_stats(client, cid)["stats_state"] == "done"
        monkeypatch.setattr(client.app.state.core, "trees", TreeCache())
        monkeypatch.setattr(ins, "_cache", ins._Cache())
        yield client, cid


def _tree_of(page: str) -> str:
    """The module tree's list, as the page (or a fragment) renders it."""
    start = page.index('<ul class="tree" role="tree"')
    stop = next(
        (at for m in ('<section class="panel table-panel">', '<div class="facts"') if (at := page.find(m, start)) > 0),
        len(page),
    )
    return page[start : page.rindex("</ul>", start, stop) + 5]


def _facts_of(page: str) -> str:
    found = re.search(r'<div class="facts" id="ckpt-facts"[^>]*>.*?</div>', page, re.S)
    assert found, "no facts"
    return found.group(0).replace(' hx-swap-oob="true"', "")


def _tree_url(page: str) -> str:
    found = re.search(r'<div id="tree" hx-get="([^"]+)" hx-trigger="load, stats-ready from:body[^"]*"', page)
    assert found, "the page does not load its tree"
    return html.unescape(found.group(1))


def test_a_small_checkpoint_page_comes_whole(stored):
    client, cid = stored
    page = client.get(f"/checkpoints/{cid}").text
    assert "data-loads-tree" not in page and "counting parameters" not in page
    assert 'data-path="layers"' in page and 'id="untrained-summary"' in page


def test_a_big_checkpoint_first_view_loads_the_same_tree_badges_and_facts_after_the_page(stored, monkeypatch):
    client, cid = stored
    monkeypatch.setattr(routes, "INLINE_TREE_TENSORS", 0)
    first = client.get(f"/checkpoints/{cid}").text
    # a readable loading state, no tree yet; the table is there
    assert "Building the module tree…" in first and 'role="status"' in first
    assert "counting parameters…" in first
    assert 'data-path="layers"' not in first and 'id="untrained-summary"' not in first
    assert f'data-tensor="layers.{NAN_LAYER}.weight"' in first  # the tensor table
    fragment = client.get(_tree_url(first), headers={"HX-Request": "true", "HX-Target": "tree"}).text
    assert 'hx-swap-oob="true"' in fragment
    # the same page as one that waited for them (the tree and insights are now built)
    whole = client.get(f"/checkpoints/{cid}").text
    assert "data-loads-tree" not in whole
    assert _tree_of(fragment) == _tree_of(whole)
    assert _facts_of(fragment) == _facts_of(whole)
    assert 'id="untrained-summary"' in _facts_of(fragment)
    layers = re.search(r'data-path="layers".*?</summary>', fragment, re.S)
    assert layers and 'data-severity="error"' in layers.group(0) and "data-untrained" in layers.group(0)


def test_the_tree_comes_before_its_badges_which_follow_the_insights(stored, monkeypatch):
    """A page that came without its tree gets the tree as soon as it is built; while the insights
    are still being computed it says so and asks for them, then loads again with its badges."""
    client, cid = stored
    monkeypatch.setattr(routes, "INLINE_TREE_TENSORS", 0)
    first = client.get(f"/checkpoints/{cid}").text
    url = _tree_url(first)
    monkeypatch.setattr(ins, "_cache", ins._Cache())  # the tree is built, the insights not yet
    early = client.get(url, headers={"HX-Request": "true"}).text
    assert 'data-path="layers"' in early and "Looking for findings and untrained layers…" in early
    assert 'data-severity="error"' not in early and 'id="untrained-summary"' not in early
    assert "counting parameters" not in early  # the facts the tree gives are there
    ask = re.search(r'class="hint insights-pending" role="status" hx-get="([^"]+)" hx-trigger="load"', early)
    assert ask
    ready = client.get(html.unescape(ask.group(1)), headers={"HX-Request": "true"})
    assert ready.status_code == 204 and ready.headers["HX-Trigger"] == "insights-ready"
    assert "insights-ready from:body" in first  # what loads the tree again
    late = client.get(url, headers={"HX-Request": "true"}).text
    assert "insights-pending" not in late and 'data-severity="error"' in late and 'id="untrained-summary"' in late
    # a module opened meanwhile (not the page's loader) waits for the insights: its badges are there
    monkeypatch.setattr(ins, "_cache", ins._Cache())
    child = client.get(f"/checkpoints/{cid}/tree", params={"path": "layers"}).text
    assert f'data-path="layers.{NAN_LAYER}"' in child and 'data-severity="error"' in child


def test_the_detail_of_a_first_view_has_the_insights_verdict(stored, monkeypatch):
    client, cid = stored
    monkeypatch.setattr(routes, "INLINE_TREE_TENSORS", 0)
    name = f"layers.{INIT_LAYER}.weight"
    first = client.get(f"/checkpoints/{cid}", params={"tensor": name}).text
    assert "data-loads-tree" in first
    verdict = re.search(r'data-verdict="(\w+)"', first)
    want = client.get(f"/api/v1/checkpoints/{cid}/tensors/{name}").json()["init"]["verdict"]
    assert verdict and verdict.group(1) == want == "init"
    again = client.get(f"/checkpoints/{cid}", params={"tensor": name}).text  # insights computed now
    assert "data-loads-tree" not in again
    assert re.search(r'<p class="init-verdict.*?</p>', again, re.S).group(0) == re.search(
        r'<p class="init-verdict.*?</p>', first, re.S
    ).group(0)


def test_a_findings_link_to_a_module_opens_the_tree_when_it_loads(stored, monkeypatch):
    client, cid = stored
    monkeypatch.setattr(routes, "INLINE_TREE_TENSORS", 0)
    first = client.get(f"/checkpoints/{cid}", params={"module": f"layers.{INIT_LAYER}"}).text
    url = _tree_url(first)
    assert f"module=layers.{INIT_LAYER}" in url and "open=layers" in url
    fragment = client.get(url, headers={"HX-Request": "true"}).text
    target = re.search(r'<li [^>]*data-finding-target="true"[^>]*>', fragment)
    assert target and f'data-path="layers.{INIT_LAYER}"' in target.group(0)
    assert '<details class="module" data-path="layers" open' in fragment


def test_the_badges_fragment_of_a_deeper_module_has_no_facts(stored):
    client, cid = stored
    fragment = client.get(f"/checkpoints/{cid}/tree", params={"path": "layers", "facts": "true"}).text
    assert "hx-swap-oob" not in fragment and f'data-path="layers.{SCALED_LAYER}"' in fragment


# --- in the browser -----------------------------------------------------------------------------


@pytest.fixture
def slow_first_view(tmp_path, model_file, monkeypatch):
    """A real server (uvicorn on a thread of this process) on which the model is big (its page does
    not wait for the tree), its tree takes a second to build and its insights three to compute."""
    monkeypatch.setattr(routes, "INLINE_TREE_TENSORS", 0)
    monkeypatch.setattr(ins, "_cache", ins._Cache())
    compute = ins._catalogue_insights

    def slow(*args, **kwargs):
        time.sleep(3.0)  # longer than the tree (the findings panel asks for the insights at once)
        return compute(*args, **kwargs)

    monkeypatch.setattr(ins, "_catalogue_insights", slow)
    app = create_app(Settings(data_dir=tmp_path / "data"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.config.port}"
    with model_file.open("rb") as fh:
        cid = httpx.post(f"{base}/api/v1/checkpoints", files={"file": ("model.safetensors", fh)}).json()["id"]
    while httpx.get(f"{base}/api/v1/checkpoints/{cid}").json()["stats_state"] != "done":
        assert time.monotonic() < deadline + 30, "stats did not finish"
        time.sleep(0.1)
    core = app.state.core
    core.trees = TreeCache()  # nothing built yet, as after a start
    tree_inputs = core.queries.tree_inputs

    def slow_tree_inputs(*args, **kwargs):
        time.sleep(1.0)
        return tree_inputs(*args, **kwargs)

    monkeypatch.setattr(core.queries, "tree_inputs", slow_tree_inputs)
    ins._cache = ins._Cache()
    yield base, cid
    server.should_exit = True
    thread.join(30)


@pytest.mark.e2e
def test_the_browser_shows_the_loading_state_then_the_tree_badges_and_facts(slow_first_view, browser):
    base, cid = slow_first_view
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{base}/checkpoints/{cid}?module=layers.{INIT_LAYER}")
        expect(page.locator("#tree .tree-loading")).to_have_text("Building the module tree…")
        expect(page.locator("#ckpt-facts .facts-loading")).to_be_visible()
        layers = page.locator("#tree li[data-path=layers]")
        expect(layers).to_be_visible(timeout=15_000)  # the tree, before the insights are done
        expect(page.locator("#tree .tree-loading")).to_have_count(0)
        expect(page.locator("#ckpt-facts .facts-loading")).to_have_count(0)
        assert "parameters" in page.locator("#ckpt-facts").inner_text()
        pending = page.locator("#tree .insights-pending")
        expect(pending).to_have_text("Looking for findings and untrained layers…")
        expect(pending).to_have_count(0, timeout=15_000)  # then the tree again, with its badges
        expect(page.locator("#untrained-summary")).to_be_visible()
        summary = layers.locator(":scope > details > summary")
        expect(summary.locator(".badge.sev-error")).to_have_text(re.compile(r"✕\s*1\s*error"))
        target = page.locator("#tree li[data-finding-target=true]")
        expect(target).to_have_attribute("data-path", f"layers.{INIT_LAYER}")
        expect(target).to_be_focused()
        expect(page.locator("#findings table.findings")).to_be_visible()
        # a tensor opened from the loaded tree shows its detail
        page.locator(f"#tree li[data-path='layers.{NAN_LAYER}'] > details > summary").click()
        page.locator(f"#tree a.leaf[data-tensor='layers.{NAN_LAYER}.weight']").click()
        expect(page.locator("#detail h2.tensor-name")).to_have_text(f"layers.{NAN_LAYER}.weight")
    finally:
        context.close()
    assert errors == [], errors
