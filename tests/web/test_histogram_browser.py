"""The detail panel's histogram in a real browser (1366x768): the SVG chart renders, bar titles
give the counts, the log toggle (htmx, remembered in the URL) changes bar heights, a tiny tensor
shows its values, an integer tensor with three distinct values shows three bars."""

from __future__ import annotations

import re
import time

import pytest
import torch
from playwright.sync_api import expect

from tests import factories as f
from tests.helpers import database_env
from tests.servers import Server

pytestmark = pytest.mark.e2e

ZERO_SHARE = 0.9  # the sparse tensor's share of exact zeros


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(14)
    dense = torch.randn(128, 256, generator=g)
    dense[torch.rand(128, 256, generator=g) < ZERO_SHARE] = 0.0
    dense[0, 0], dense[0, 1], dense[0, 2] = float("nan"), float("inf"), -float("inf")
    return {
        "encoder.dense.weight": dense,
        "encoder.tiny.bias": torch.tensor([0.5, -1.25, 3.0, 0.0, 2.0]),
        "encoder.labels": torch.tensor([0] * 500 + [3] * 200 + [7] * 50, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("hist") / "data"
    srv = Server(data, database_env())
    files = tmp_path_factory.mktemp("hist-files")
    t = tensors()
    body = srv.upload(f.save_safetensors(t, files / "sparse.safetensors"))
    deadline = time.monotonic() + 60
    while srv.get(f"/api/v1/checkpoints/{body['id']}")["stats_state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, "stats did not finish"
        time.sleep(0.1)
    yield srv.base + f"/checkpoints/{body['id']}", t
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.fixture
def page(browser, artifacts_dir):
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    pg = context.new_page()
    errors: list[str] = []  # JS exceptions and console errors (CSP violations included)
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()
    assert errors == [], errors


def bar_heights(page) -> list[float]:
    return [
        float(h)
        for h in page.eval_on_selector_all("#detail svg.hist-svg rect", "els => els.map(e => e.getAttribute('height'))")
    ]


def test_histogram_with_zeros_apart_chips_and_log_toggle(site, page, artifacts_dir):
    url, t = site
    x = t["encoder.dense.weight"]
    zeros = int((x == 0).sum())
    finite = int(torch.isfinite(x).sum())
    page.goto(url + "?tensor=encoder.dense.weight")
    chart = page.locator("#detail figure.hist-chart")
    expect(chart).to_have_attribute("data-scale", "linear")
    svg = chart.locator("svg.hist-svg")
    assert svg.get_attribute("role") == "img"
    assert "64 bins" in svg.get_attribute("aria-label")
    assert svg.locator("rect").count() == 64

    # every bar's title gives its range and count; with the zeros drawn apart they add up
    titles = page.eval_on_selector_all("#detail svg.hist-svg rect > title", "els => els.map(e => e.textContent)")
    counts = [int(re.search(r"[\])]: ([\d,]+)", s).group(1).replace(",", "")) for s in titles]
    assert sum(counts) + zeros == finite
    assert sum("exact zeros, shown apart" in s for s in titles) == 1
    assert chart.locator("[data-chip=zeros]").inner_text() == f"0: {zeros:,}"
    assert chart.locator("path.hist-zero > title").text_content() == f"0: {zeros:,} exact zeros"
    assert chart.locator("[data-chip=nan]").inner_text() == "NaN: 1"
    assert chart.locator("[data-chip=inf]").inner_text() == "±Inf: 2"
    # axes with ticks and labels; the percentiles (exact, from the stats engine)
    assert chart.locator("text.hist-x-label").count() >= 2
    assert "0" in chart.locator("text.hist-x-label").all_text_contents()
    assert chart.locator("text.hist-y-label").count() >= 2
    assert "Percentiles (exact):" in chart.locator("figcaption").inner_text()  # issue 15: the engine's own
    assert chart.locator("[data-percentile=median]").inner_text() == "median 0"  # 90% zeros
    assert chart.locator("details.hist-table tr").count() == 64 + 2  # header, exactly 0, 64 bins
    linear = bar_heights(page)
    page.screenshot(path=str(screens(artifacts_dir) / "histogram-linear.png"))

    # the log toggle re-renders the detail through htmx and is remembered in the URL
    chart.locator("a[data-scale-link=log]").click()
    expect(page.locator("#detail figure.hist-chart")).to_have_attribute("data-scale", "log")
    assert "hist=log" in page.url and "tensor=encoder.dense.weight" in page.url
    log = bar_heights(page)
    assert len(log) == 64
    lifted = [(a, b) for a, b in zip(linear, log, strict=True) if a > 0]
    assert lifted and all(b >= a for a, b in lifted) and sum(b > 2 * a for a, b in lifted) > 10
    assert "count (log)" in page.locator("#detail svg.hist-svg").inner_html()
    page.locator("#detail").screenshot(path=str(screens(artifacts_dir) / "histogram-log.png"))

    # the pushed URL opens as a full page with the log scale
    page.goto(page.url)
    assert bar_heights(page) == log
    page.locator("#detail a[data-scale-link=linear]").click()
    expect(page.locator("#detail figure.hist-chart")).to_have_attribute("data-scale", "linear")
    assert "hist=log" not in page.url
    assert bar_heights(page) == linear


def test_tiny_tensor_values_and_distinct_integer_bars(site, page, artifacts_dir):
    url, _ = site
    page.goto(url + "?tensor=encoder.labels&hist=log")
    detail = page.locator("#detail")
    expect(detail.locator("svg.hist-svg")).to_have_attribute("data-kind", "values")
    titles = page.eval_on_selector_all("#detail svg.hist-svg rect > title", "els => els.map(e => e.textContent)")
    assert titles == ["0: 500", "3: 200", "7: 50"]
    assert detail.locator("text.hist-x-label").all_text_contents() == ["0", "3", "7"]
    page.locator("#detail").screenshot(path=str(screens(artifacts_dir) / "histogram-distinct.png"))

    # open the tiny tensor from the table (htmx into #detail): its values, one format
    page.click("table.tensors a:text-is('encoder.tiny.bias')")
    expect(detail.locator("h2.tensor-name")).to_have_text("encoder.tiny.bias")
    cells = detail.locator(".tensor-values td[data-value]").all_inner_texts()
    assert cells == ["0.50", "-1.25", "3.00", "0.00", "2.00"]
    assert "hist=log" in page.url  # the scale chosen stays as tensors change
    page.locator("#detail").screenshot(path=str(screens(artifacts_dir) / "histogram-tiny.png"))


def screens(artifacts_dir):
    out = artifacts_dir / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out
