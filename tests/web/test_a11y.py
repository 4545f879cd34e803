"""Accessibility: axe-core in the browser on every page (no serious or critical violations), and
the main controls operable by keyboard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import database_env
from tests.servers import Server

pytestmark = pytest.mark.e2e

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
BAD = ("serious", "critical")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("a11y") / "data"
    srv = Server(data, database_env())
    files = tmp_path_factory.mktemp("a11y-files")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    torch.save(model.state_dict(), files / "a.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, files / "b.pt")
    a = srv.upload(files / "a.pt")
    b = srv.upload(files / "b.pt")
    yield srv.base, a["id"], b["id"]
    assert srv.terminate()
    assert "Traceback" not in srv.log()


def _violations(page) -> list[dict]:
    page.add_script_tag(content=AXE.read_text())
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"][:5]]}
        for v in result["violations"]
        if v["impact"] in BAD
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/checkpoints/{a}",
        "/checkpoints/{a}?tensor=0.weight",
        "/checkpoints/{b}?root=",
        "/compare",
        "/compare?a={a}&b={b}",
        "/docs",
        "/no-such-page",
    ],
)
@pytest.mark.parametrize("width", [1366, 800])
def test_no_serious_or_critical_axe_violations(browser, site, path, width):
    base, a, b = site
    # axe is injected as a script: the page's CSP (no inline script) is bypassed for the audit only
    context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(base + path.format(a=a, b=b))
        page.wait_for_load_state("networkidle")
        assert _violations(page) == []
    finally:
        context.close()


def test_every_control_of_the_checkpoint_page_is_reachable_by_tab(browser, site):
    base, a, _ = site
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    try:
        page.goto(f"{base}/checkpoints/{a}")
        page.wait_for_load_state("networkidle")
        controls = page.evaluate(
            """() => [...document.querySelectorAll('a[href], button, input, select, summary, textarea')]
                .filter(e => e.checkVisibility() && !e.disabled)
                .map(e => e.outerHTML.slice(0, 80))"""
        )
        reached: set[str] = set()
        first = None
        for _ in range(600):  # until the focus comes round to the first control again
            page.keyboard.press("Tab")
            now = page.evaluate("() => document.activeElement ? document.activeElement.outerHTML.slice(0, 80) : ''")
            if now == first:
                break
            first = first or now
            reached.add(now)
        missing = [c for c in controls if c not in reached]
        assert missing == [], missing[:10]
    finally:
        context.close()
