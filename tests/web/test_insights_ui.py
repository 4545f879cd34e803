"""Issue 15 in the browser UI: the findings panel (htmx, after the page), tree badges by severity
and the untrained roll-up, the tensor detail's exact percentiles, zero fraction, init verdict and
log-magnitude histogram; plus the chart data of that histogram (ckptscope/web/charts.py) unit by
unit. The browser part drives a real uvicorn server with Debian's chromium at 1366x768."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from playwright.sync_api import expect

from ckptscope.stats import TensorStats
from ckptscope.stats.model import PERCENTILES, LogHistogram
from ckptscope.web import charts
from tests import factories as f
from tests.helpers import database_env
from tests.servers import Server

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
EVIL = '<img src=x onerror="pwned=1">'  # no dot: one module name
LAYERS = 7  # layers.N.weight: Laplace-distributed ("trained"), except
NAN_LAYER, SCALED_LAYER, INIT_LAYER = 3, 2, 6  # one NaN; 50x the others; normal_(0, 0.02) as initialised


def log_hist_of(x: torch.Tensor) -> LogHistogram:
    """The reference log-magnitude histogram: 2**e <= |x| < 2**(e+1), by sign (numpy.frexp)."""
    v = x[torch.isfinite(x)].double().numpy()
    _, exp = np.frexp(v)  # v = m * 2**exp with 0.5 <= |m| < 1, so e = exp - 1
    e = exp - 1
    neg = {int(k): int(c) for k, c in zip(*np.unique(e[v < 0], return_counts=True), strict=True)}
    pos = {int(k): int(c) for k, c in zip(*np.unique(e[v > 0], return_counts=True), strict=True)}
    return LogHistogram(neg, int((v == 0).sum()), pos)


# --- the magnitude chart's data -----------------------------------------------------------------


def test_magnitude_chart_mirrors_negative_magnitudes_around_the_zeros():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(4000, generator=g) * 0.05
    x[:300] = 0.0
    x[300:320] = -3.0  # 2**1 <= 3 < 2**2, on the negative side only
    h = log_hist_of(x)
    c = charts.magnitude_chart(h, name="w")
    assert c is not None and c.kind == "magnitude"
    exps = sorted({*h.neg, *h.pos})
    n = exps[-1] - exps[0] + 1
    assert len(c.bars) == 2 * n + 1
    sides = [b.side for b in c.bars]
    assert sides == ["neg"] * n + ["zero"] + ["pos"] * n
    assert sum(b.count for b in c.bars) == x.numel()
    zero = c.bars[n]
    assert zero.count == 300 and zero.label == "exactly 0"
    centre = zero.x + zero.w / 2
    for e, count in h.pos.items():  # the positive slot of e and the negative one mirror each other
        right = c.bars[n + 1 + e - exps[0]]
        left = c.bars[n - 1 - (e - exps[0])]
        assert right.count == count and left.count == h.neg.get(e, 0)
        assert math.isclose(centre - (left.x + left.w / 2), (right.x + right.w / 2) - centre, abs_tol=0.05)
        assert f"2^{e} (" in right.title and f"-2^{e} (" in left.title
    # the -3.0 values: the leftmost bar of all (the largest magnitude) and nothing on the right
    assert c.bars[0].count == 20 and c.bars[-1].count == 0
    labels = [t.label for t in c.x_ticks]
    assert "0" in labels and all(re.fullmatch(r"0|-?2[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+", s) for s in labels), labels
    assert [t.pos for t in c.x_ticks] == sorted(t.pos for t in c.x_ticks)
    for a, b in zip(c.x_ticks, c.x_ticks[1:], strict=False):  # labels never overlap
        assert b.pos - a.pos >= (len(a.label) + len(b.label)) * charts.LABEL_CHAR / 2
    negatives = int((x < 0).sum())
    assert f"{x.numel():,} finite values" in c.summary and f"{negatives:,} negative" in c.summary
    assert "300 zeros in the middle" in c.summary


def test_magnitude_chart_log_scale_clipping_and_empty():
    h = LogHistogram({}, 0, dict.fromkeys(range(-140, 10), 1))  # float32 subnormals to 1000
    c = charts.magnitude_chart(h, log=True)
    assert c is not None and c.log
    n = charts.MAX_EXPONENTS
    assert len(c.bars) == 2 * n + 1
    assert sum(b.count for b in c.bars) == 150
    lowest = c.bars[n + 1]  # the innermost positive slot holds every smaller magnitude
    assert lowest.count == 150 - (n - 1) and lowest.label.startswith("0 < x < 2^")
    assert "no negative values" in c.summary and "from 2^-140 to 2^10" in c.summary
    assert charts.magnitude_chart(None) is None
    assert charts.magnitude_chart(LogHistogram({}, 0, {})) is None
    only_zeros = charts.magnitude_chart(LogHistogram({}, 5, {}))
    assert only_zeros is not None and [b.count for b in only_zeros.bars] == [5]


# --- exact percentiles --------------------------------------------------------------------------


def _stats(x: torch.Tensor, *, exact: bool) -> TensorStats:
    v = x.double()
    lo, hi = float(v.min()), float(v.max())
    hist = torch.histc(v, 64, lo, hi).long().tolist()
    pct = {k: float(torch.quantile(v, float(k) / 100)) for k in PERCENTILES} if exact else None
    return TensorStats(
        numel=x.numel(),
        mean=float(v.mean()),
        std=float(v.std()),
        min=lo,
        max=hi,
        zeros=int((v == 0).sum()),
        hist=hist,
        hist_min=lo,
        hist_max=hi,
        percentiles=pct,
        log_hist=log_hist_of(x),
    )


def test_exact_percentiles_replace_the_histogram_estimates():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    x[:50] = 0.0
    exact = charts.bins_chart(_stats(x, exact=True), name="w")
    approx = charts.bins_chart(_stats(x, exact=False), name="w")
    assert exact is not None and approx is not None
    assert exact.exact and not approx.exact
    assert "median = " in exact.summary and "median ≈ " in approx.summary
    want = {n: float(torch.quantile(x.double(), q / 100)) for n, q in charts.PERCENTILES}
    marks = {n: m.value for m in exact.percentiles for n in m.name.split("/")}  # "p25/median": one place
    assert set(marks) == set(want)
    for name in ("p1", "p99"):
        assert marks[name] == want[name]
    assert dict(exact.estimates)["median"] == charts.number(want["median"])
    assert dict(approx.estimates)["p75"] != dict(exact.estimates)["p75"]  # the estimates were not exact


def test_percentile_rows_zero_fraction_and_the_view():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    x[:250] = 0.0
    s = _stats(x, exact=True)
    rows = charts.percentile_rows(s)
    assert rows is not None and [r.key for r in rows] == list(PERCENTILES)
    assert [r.label for r in rows][:2] == ["p0.1", "p1"] and rows[-1].label == "p99.9"
    assert [r.value for r in rows] == sorted(r.value for r in rows)
    assert charts.zero_fraction(s) == 0.25
    view = charts.histogram_view(s, name="w")
    assert view.percentiles == rows and view.zero_fraction == 0.25
    assert view.magnitude is not None and sum(b.count for b in view.magnitude.bars) == 1000
    without = _stats(x, exact=False)
    without.log_hist = None
    bare = charts.histogram_view(without)
    assert bare.percentiles is None and bare.magnitude is None
    assert charts.zero_fraction(TensorStats(numel=0)) is None


@pytest.mark.parametrize("exact", [True, False])
def test_histogram_template_says_exact_or_estimated(exact):
    from types import SimpleNamespace

    from ckptscope.web.templating import env

    x = torch.randn(2000, generator=torch.Generator().manual_seed(5))
    view = charts.histogram_view(_stats(x, exact=exact), name="w")
    html = env.get_template("histogram.html").render(
        histogram=view, ckpt=SimpleNamespace(id="c"), params={}, page=1, selected="w"
    )
    caption = re.search(r'data-estimates="(\w+)">([^:]+):', html)
    assert caption is not None
    if exact:
        assert caption.groups() == ("exact", "Percentiles (exact)")
        assert "<title>median = " in html and "(from the histogram)" not in html
    else:
        assert caption.groups() == ("histogram", "Percentiles ≈ from the histogram")
        assert "<title>median ≈ " in html and "(from the histogram)</title>" in html
    assert html.count('<figure class="mag-chart"') == 1


@pytest.mark.parametrize(
    ("stats", "says"),
    [
        (None, "No findings: no rule fired."),
        ({"state": "running"}, "Statistics are still being computed"),
        ({"state": "failed"}, "Computing statistics failed"),
    ],
)
def test_findings_block_says_where_the_stats_stand(stats, says):
    from types import SimpleNamespace

    from ckptscope.services.insights import Insights
    from ckptscope.web.templating import env

    tmpl = env.get_template("checkpoint.html")
    context = {"ckpt": SimpleNamespace(id="c"), "params": {}, "findings": [], "stats": stats}
    context["insights"] = Insights({}, [], {})
    html = "".join(tmpl.blocks["findings"](tmpl.new_context(context)))
    assert says in html
    assert ("no rule fired" in html) is (stats is None)  # "none" only once every tensor was looked at


# --- in the browser -----------------------------------------------------------------------------


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(15)
    torch.manual_seed(15)
    laplace = torch.distributions.Laplace(0.0, 0.03)  # heavy-tailed: no initialiser draws that
    out = {f"layers.{i}.weight": laplace.sample((64, 64)) for i in range(LAYERS)}
    out[f"layers.{INIT_LAYER}.weight"] = torch.randn(64, 64, generator=g) * 0.02
    out[f"layers.{SCALED_LAYER}.weight"] *= 50
    out[f"layers.{NAN_LAYER}.weight"][0, 0] = float("nan")
    sparse = torch.randn(32, 32, generator=g)
    sparse[sparse.abs() < 0.5] = 0.0
    out["head.weight"] = sparse
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("insights") / "data"
    srv = Server(data, database_env())
    files = tmp_path_factory.mktemp("insights-files")
    t = tensors()
    body = srv.upload(f.save_safetensors(t, files / "model.safetensors"))
    evil = {f"{EVIL}.{i}.weight": torch.randn(16, 16) * 0.02 for i in range(4)}  # attacker text in names
    evil[f"{EVIL}.1.weight"][0, 0] = float("nan")
    bad = srv.upload(f.save_safetensors(evil, files / "evil.safetensors"))
    deadline = time.monotonic() + 60
    for cid in (body["id"], bad["id"]):
        while srv.get(f"/api/v1/checkpoints/{cid}")["stats_state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, "stats did not finish"
            time.sleep(0.1)
    srv.evil_id = bad["id"]
    yield srv, body["id"], t
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    pg = context.new_page()
    errors: list[str] = []  # JS exceptions and console errors (CSP violations included)
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()
    assert errors == [], errors


def screens(artifacts_dir: Path) -> Path:
    out = artifacts_dir / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.e2e
def test_findings_panel_lists_the_nan_and_the_scaled_layer_and_opens_them(site, page, artifacts_dir):
    srv, cid, _ = site
    page.goto(f"{srv.base}/checkpoints/{cid}")
    panel = page.locator("#findings")
    expect(panel.locator("table.findings")).to_be_visible()  # loaded by htmx after the page
    rows = panel.locator("tbody tr")
    found = {(r.get_attribute("data-rule"), r.get_attribute("data-target")) for r in rows.all()}
    assert ("nan-inf", f"layers.{NAN_LAYER}.weight") in found
    assert ("variance-exploding", f"layers.{SCALED_LAYER}.weight") in found
    nan_row = panel.locator(f"tr[data-rule=nan-inf][data-target='layers.{NAN_LAYER}.weight']")
    assert nan_row.get_attribute("data-severity") == "error"
    assert nan_row.locator(".badge.sev-error").inner_text().strip().endswith("error")  # text, not colour alone
    assert "nan=1" in nan_row.locator("td.values").inner_text()
    scaled = panel.locator(f"tr[data-rule=variance-exploding][data-target='layers.{SCALED_LAYER}.weight']")
    assert "ratio=" in scaled.locator("td.values").inner_text()
    assert scaled.locator("td.threshold").inner_text().strip() != ""
    # the untrained layer among trained ones: a module finding
    layer = panel.locator(f"tr[data-rule=untrained-among-trained][data-target='layers.{INIT_LAYER}']")
    assert layer.get_attribute("data-level") == "module"
    # the same list as the REST API's
    api = srv.get(f"/api/v1/checkpoints/{cid}/findings")
    assert {(x["rule"], x["target"]) for x in api["findings"]} == found
    page.screenshot(path=str(screens(artifacts_dir) / "insights-findings.png"))

    # a tensor target opens the tensor in the detail (htmx, pushed URL)
    nan_row.locator("a.finding-target").click()
    expect(page.locator("#detail h2.tensor-name")).to_have_text(f"layers.{NAN_LAYER}.weight")
    assert f"tensor=layers.{NAN_LAYER}.weight" in page.url
    # a module target opens the tree down to the module, focused
    page.keyboard.press("Escape")
    panel.locator(f"tr[data-level=module][data-target='layers.{INIT_LAYER}'] a.finding-target").click()
    target = page.locator("#tree li[data-finding-target=true]")
    expect(target).to_have_attribute("data-path", f"layers.{INIT_LAYER}")
    expect(target).to_be_focused()
    assert f"module=layers.{INIT_LAYER}" in page.url


@pytest.mark.e2e
def test_tree_badges_by_severity_and_a_module_link_opens_the_tree(site, page):
    srv, cid, _ = site
    page.goto(f"{srv.base}/checkpoints/{cid}")
    layers = page.locator("#tree li[data-path=layers]")
    summary = layers.locator(":scope > details > summary")
    error = summary.locator(".badge.sev-error")
    assert error.inner_text().split() == ["✕", "1", "error"]  # a shape and a word, not colour alone
    assert error.locator(".visually-hidden").inner_text().strip() == "error"  # the word for screen readers
    assert error.get_attribute("title") == "1 error at or under layers"
    assert summary.locator(".badge.sev-warning").inner_text().split()[0] == "▲"
    modules = srv.get(f"/api/v1/checkpoints/{cid}/findings")["modules"]
    for sev in ("error", "warning", "info"):  # the same counts as the REST API's roll-up
        shown = summary.locator(f".badge.sev-{sev}")
        want = modules["layers"]["findings"][sev]
        assert shown.count() == (1 if want else 0)
        if want:
            assert shown.get_attribute("data-count") == str(want)
    # randn * 0.02 looks like normal_(0, 0.02): the untrained roll-up, in the tree and the header
    m = modules["layers"]
    assert m["untrained"] == 1 and m["layers"] >= LAYERS - 1  # the NaN layer may get no verdict
    untrained = summary.locator(".badge.untrained")
    assert untrained.inner_text() == f"{m['untrained']}/{m['layers']} untrained"
    assert untrained.get_attribute("title").startswith(f"{m['untrained']} of {m['layers']} layers look untrained")
    top = modules[""]
    assert (
        page.locator("#untrained-summary").inner_text()
        == f"{top['untrained']} of {top['layers']} layers look untrained"
    )
    assert page.locator("#tree li[data-path=head] .badge.sev-error").count() == 0
    # children loaded as a module opens (the tree route) carry their badges too
    summary.click()
    nan_layer = page.locator(f"#tree li[data-path='layers.{NAN_LAYER}'] > details > summary")
    expect(nan_layer.locator(".badge.sev-error")).to_have_attribute("data-count", "1")
    assert page.locator("#tree li[data-path='layers.0'] > details > summary .badge.sev").count() == 0

    # stats-ready (what the progress poll answers when the stats finish) reloads the findings and the tree
    expect(page.locator("#findings table.findings")).to_be_visible()
    page.evaluate("() => { document.querySelector('#findings table').dataset.old = '1'; }")
    page.evaluate("() => htmx.trigger(document.body, 'stats-ready')")
    expect(page.locator("#findings table[data-old]")).to_have_count(0)
    expect(page.locator("#findings tr[data-rule=nan-inf]")).to_have_count(1)
    expect(page.locator("#tree li[data-path=layers] > details > summary .badge.sev-error")).to_have_count(1)

    # ?module= (the findings' module links) renders the tree open down to the module and focuses it
    page.goto(f"{srv.base}/checkpoints/{cid}?module=layers.{NAN_LAYER}")
    target = page.locator("#tree li[data-finding-target=true]")
    expect(target).to_have_attribute("data-path", f"layers.{NAN_LAYER}")
    expect(target).to_be_focused()
    assert page.locator("#tree li[data-path=layers]").get_attribute("aria-expanded") == "true"
    assert target.locator(":scope > details > summary .badge.sev-error").count() == 1
    # the keyboard tree still works from there
    page.keyboard.press("ArrowRight")  # open: to the first child
    expect(page.locator(f"#tree li[data-tensor='layers.{NAN_LAYER}.weight']")).to_be_focused()


@pytest.mark.e2e
def test_detail_exact_percentiles_zero_fraction_init_and_magnitude_chart(site, page, artifacts_dir):
    srv, cid, t = site
    name = "head.weight"
    x = t[name]
    page.goto(f"{srv.base}/checkpoints/{cid}?tensor={name}")
    detail = page.locator("#detail")
    expect(detail.locator("h2.tensor-name")).to_have_text(name)
    table = detail.locator("table.percentiles")
    expect(table).to_be_visible()
    want = {k: float(torch.quantile(x.double().flatten(), float(k) / 100)) for k in PERCENTILES}
    cells = {c.get_attribute("data-percentile"): c.inner_text() for c in table.locator("td[data-percentile]").all()}
    assert list(cells) == list(PERCENTILES)
    for k, text in cells.items():  # to the display precision (the shortest repr of the float64)
        assert float(text.replace(",", "")) == pytest.approx(want[k], rel=1e-6, abs=1e-12), k
    # the chart's marks are the exact ones now
    assert detail.locator("[data-estimates]").get_attribute("data-estimates") == "exact"
    assert "≈" not in detail.locator("figure.hist-chart figcaption").inner_text()
    zeros = int((x == 0).sum())
    frac = detail.locator("td[data-stat=zero_fraction]").inner_text()
    assert float(frac.rstrip("%")) == pytest.approx(100 * zeros / x.numel(), rel=1e-3)
    verdict = detail.locator(".init-verdict")
    assert verdict.get_attribute("data-verdict") == "trained"
    assert "does not look like an initialisation" in verdict.inner_text()

    # the log-magnitude histogram beside the linear one, with its text alternative
    mag = detail.locator("figure.mag-chart")
    svg = mag.locator("svg.mag-svg")
    assert svg.get_attribute("role") == "img"
    assert svg.locator("title#mag-title").count() == 1
    desc = svg.locator("desc#mag-desc").text_content()
    assert f"{zeros:,} zeros in the middle" in desc
    h = log_hist_of(x)
    counts = [int(v) for v in svg.locator("rect").evaluate_all("els => els.map(e => e.dataset.count)")]
    sides = svg.locator("rect").evaluate_all("els => els.map(e => e.dataset.side)")
    exps = sorted({*h.neg, *h.pos})
    n = exps[-1] - exps[0] + 1
    assert sides == ["neg"] * n + ["zero"] + ["pos"] * n
    assert counts[n] == zeros and sum(counts) == x.numel()
    assert counts[n + 1 :] == [h.pos.get(e, 0) for e in range(exps[0], exps[-1] + 1)]
    assert counts[:n] == [h.neg.get(e, 0) for e in range(exps[-1], exps[0] - 1, -1)]
    labels = mag.locator("text.mag-x-label").all_text_contents()
    assert "0" in labels and any(s.startswith("2") for s in labels) and any(s.startswith("-2") for s in labels)
    mag.locator("details.hist-table > summary").click()
    assert mag.locator("details.hist-table tbody tr").count() == sum(1 for c in counts if c)
    detail.screenshot(path=str(screens(artifacts_dir) / "insights-detail.png"))

    # the log toggle scales both charts; the detail still renders when htmx swaps it
    detail.locator("a[data-scale-link=log]").click()
    expect(page.locator("#detail figure.mag-chart")).to_have_attribute("data-scale", "log")
    expect(page.locator("#detail table.percentiles")).to_be_visible()

    # the initialised layer's verdict names its initialiser
    page.click(f"table.tensors a:text-is('layers.{INIT_LAYER}.weight')")
    expect(detail.locator("h2.tensor-name")).to_have_text(f"layers.{INIT_LAYER}.weight")
    verdict = page.locator("#detail .init-verdict")
    expect(verdict).to_have_attribute("data-verdict", "init")
    assert re.search(r"looks like its initialisation: .*normal_\(0, 0\.02\).*, score [\d.e+-]+", verdict.inner_text())


@pytest.mark.e2e
def test_attacker_names_are_escaped_in_findings_and_badges(site, page):
    srv, _, _ = site
    page.goto(f"{srv.base}/checkpoints/{srv.evil_id}")
    row = page.locator("#findings tr[data-rule=nan-inf]")
    expect(row).to_have_count(1)
    assert row.locator("a.finding-target").inner_text() == f"{EVIL}.1.weight"
    expect(page.locator(f"#tree li[data-path='{EVIL}'] .badge.sev-error")).to_have_count(1)
    assert page.locator("#findings img, #tree img").count() == 0
    assert page.evaluate("() => window.pwned") is None


@pytest.mark.e2e
@pytest.mark.parametrize("width", [1366, 800])
def test_no_serious_axe_violations_in_the_new_panels(site, browser, width):
    srv, cid, _ = site
    context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(f"{srv.base}/checkpoints/{cid}?tensor=head.weight")
        expect(page.locator("#findings table.findings")).to_be_visible()
        expect(page.locator("#detail figure.mag-chart")).to_be_visible()
        page.add_script_tag(content=AXE.read_text())
        scope = "{include: [['#findings'], ['#detail'], ['#tree']]}"
        result = page.evaluate(f"async () => await axe.run({scope}, {{resultTypes: ['violations']}})")
        bad = [
            {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"][:5]]}
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert bad == []
    finally:
        context.close()
