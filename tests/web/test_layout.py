"""The checkpoint page's layout and navigation in a real browser: key columns visible at laptop
sizes, no horizontal overflow at half a screen, the detail in view after a click, search/filters/
sort/page composing in the URL, the tree's state kept across the stats-ready refresh, paging, and
the module tree operated by keyboard. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from playwright.sync_api import expect
from torch import nn

from tests.helpers import database_env
from tests.servers import Server

pytestmark = pytest.mark.e2e

LONG = "attention_output_projection_with_a_rather_long_name"
KEY_COLUMNS = ["name", "numel", "mean", "std", "min", "max", "absmax", "nan"]
LAPTOP = [(1366, 768), (1440, 900)]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        setattr(self, LONG, nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Linear(8, 4)


class Deep(nn.Module):
    """368 tensors: an embedding, 60 blocks of 6 tensors, a BatchNorm (5 tensors), a head."""

    def __init__(self, blocks: int = 60) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)


def deep_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = Deep().state_dict()
    sd["blocks.3.ff.weight"][0, :2] = float("nan")
    sd["blocks.10.norm.bias"][1] = float("inf")
    sd["blocks.5.ff.bias"].mul_(1e-6)  # tiny values: the page's number columns go scientific
    sd["blocks.7.ff.weight"].mul_(1e6)  # and huge ones
    return sd


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("layout") / "data"
    files = tmp_path_factory.mktemp("layout-files")
    srv = Server(data, database_env())
    torch.save(deep_state_dict(), files / "deep.pt")
    small = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).state_dict()
    torch.save(small, files / "small.pt")
    deep = srv.upload(files / "deep.pt")
    other = srv.upload(files / "small.pt")
    deadline = time.monotonic() + 60
    while srv.get(f"/api/v1/checkpoints/{deep['id']}")["stats_state"] != "done":
        assert time.monotonic() < deadline, "stats did not finish"
        time.sleep(0.2)
    yield srv.base, deep["id"], other["id"]
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.fixture(scope="module")
def shots(artifacts_dir):
    path = artifacts_dir / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location}") if msg.type == "error" else None)
    page.errors = errors
    return context, page


@pytest.fixture
def laptop(browser):
    context, page = open_page(browser, 1366, 768)
    yield page
    context.close()
    assert page.errors == [], page.errors


def params(page) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)


def last(page, name: str) -> str | None:
    values = params(page).get(name)
    return values[-1] if values else None


def first_names(page, n: int = 3) -> list[str]:
    return page.locator("#tensor-table tbody tr td.name a").all_inner_texts()[:n]


def expect_first(page, names: list[str]) -> None:
    """The table's first rows are these (waits for the swap)."""
    links = page.locator("#tensor-table tbody tr td.name a")
    for i, name in enumerate(names):
        expect(links.nth(i)).to_have_text(name)


def cut_numbers(page) -> list[str]:
    """Numeric cells and headers of the tensor table whose text does not fit (shown cut)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#tensor-table td.num, #tensor-table th')]
                 .filter(td => td.scrollWidth > td.clientWidth + 1).map(td => td.textContent)"""
    )


def page_overflow(page) -> int:
    return page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")


def in_viewport(page, selector: str) -> bool:
    """Wholly inside the viewport's width, its top on screen (htmx settles a swapped element's
    attributes, its class among them, a moment after the swap: wait for it)."""
    expect(page.locator(selector)).to_be_in_viewport()
    box = page.evaluate(
        """(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
                      return {top: r.top, left: r.left, right: r.right, width: r.width, height: r.height,
                              vw: innerWidth, vh: innerHeight, n: document.querySelectorAll(sel).length}; }""",
        selector,
    )
    shown = box["width"] > 0 and box["height"] > 0 and box["top"] >= 0 and box["left"] >= 0
    if not (shown and box["top"] < box["vh"] and box["right"] <= box["vw"] + 0.5):
        print("not in the viewport:", selector, box)
        return False
    return True


@pytest.mark.parametrize(("width", "height"), LAPTOP)
def test_key_columns_fit_without_horizontal_scrolling(browser, site, shots, width, height):
    base, deep, _ = site
    context, page = open_page(browser, width, height)
    try:
        page.goto(f"{base}/checkpoints/{deep}")
        edges = page.evaluate(
            """() => {
                const box = document.querySelector('#tensor-table .table-scroll').getBoundingClientRect();
                const cells = [...document.querySelectorAll('#tensor-table thead th')].map(th => {
                    const r = th.getBoundingClientRect();
                    return {col: th.dataset.col, right: r.right, left: r.left};
                });
                return {container: box.right, viewport: innerWidth, cells};
            }"""
        )
        assert [c["col"] for c in edges["cells"]] == KEY_COLUMNS
        for cell in edges["cells"]:
            assert cell["right"] <= edges["container"] + 0.5, cell
            assert cell["right"] <= edges["viewport"], cell
            assert cell["right"] - cell["left"] > 30, cell  # really shown, not squeezed to nothing
        assert page_overflow(page) <= 0
        scroller = page.locator("#tensor-table .table-scroll")
        assert scroller.evaluate("e => e.scrollWidth <= e.clientWidth"), "the table scrolls sideways"
        # numbers are never cut: each numeric cell's text fits its column
        assert cut_numbers(page) == []
        # a long name is truncated with an ellipsis and carries the full name as its title
        link = page.locator(f"#tensor-table a.tname[title='blocks.0.{LONG}.weight']")
        assert link.inner_text() == f"blocks.0.{LONG}.weight"
        assert link.evaluate("a => a.scrollWidth > a.clientWidth && getComputedStyle(a).textOverflow === 'ellipsis'")
        # tree rows are one line each, the leaf checkbox on its row
        page.click("details[data-path='blocks'] > summary")
        page.click("details[data-path='blocks.0'] > summary")
        page.click("details[data-path='blocks.0.norm'] > summary")
        page.wait_for_selector("li[data-tensor='blocks.0.norm.weight']")
        heights = page.evaluate(
            """() => [...document.querySelectorAll('#tree details.module > summary, #tree .leaf-row')]
                     .filter(e => e.offsetParent !== null).map(e => e.getBoundingClientRect().height)"""
        )
        assert len(heights) > 10 and max(heights) < 1.6 * min(heights), heights
        box_top = page.locator("li[data-tensor='blocks.0.norm.weight'] input.leaf-select").bounding_box()
        name_top = page.locator("li[data-tensor='blocks.0.norm.weight'] a.leaf .name").bounding_box()
        assert abs((box_top["y"] + box_top["height"] / 2) - (name_top["y"] + name_top["height"] / 2)) < 6
        page.screenshot(path=str(shots / f"checkpoint-{width}x{height}.png"))
    finally:
        context.close()
    assert page.errors == [], page.errors


def test_numbers_one_format_per_column_full_precision_on_hover(laptop, site):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}")
    sci = re.compile(r"^-?\d\.\d{3}e[+-]\d\d$")
    columns = page.evaluate(
        """() => { const out = {};
                   for (const td of document.querySelectorAll('#tensor-table td[data-col]')) {
                       (out[td.dataset.col] = out[td.dataset.col] || []).push([td.textContent, td.title]); }
                   return out; }"""
    )
    assert set(columns) == {"mean", "std", "min", "max", "absmax"}
    for col, cells in columns.items():
        shown = [text for text, _ in cells if text not in ("0", "-")]
        kinds = {bool(sci.match(text)) for text in shown}
        assert len(kinds) == 1, (col, shown)  # never fixed in one row and scientific in the next
        for text, title in cells:
            if text not in ("0", "-"):
                assert float(title) == pytest.approx(float(text), rel=1e-3)
                assert len(title.replace("-", "").replace(".", "")) >= 5 or float(title) == float(text)
    assert columns["mean"] and all(sci.match(t) for t, _ in columns["mean"] if t not in ("0", "-"))
    # a page without tiny or huge values shows fixed notation
    page.goto(f"{base}/checkpoints/{deep}?q=blocks.30.&sort=name")
    shown = page.locator("#tensor-table td[data-col=std]").all_inner_texts()
    assert shown and not any("e" in t for t in shown)
    # the detail panel shows full precision
    page.locator("#tensor-table a.tname").first.click()
    value = page.locator("#detail [data-stat=std]")
    expect(value).to_have_attribute("title", re.compile(r"\d"))
    assert value.inner_text() == value.get_attribute("title") and len(value.inner_text()) > 8


def test_detail_in_view_and_selection_highlighted_after_clicking_the_40th_row(laptop, site, shots):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}?sort=std&desc=true")
    row = page.locator("#tensor-table tbody tr").nth(39)
    name = row.get_attribute("data-tensor")
    row.locator("a.tname").click()
    expect(page.locator("#detail h2.tensor-name")).to_have_text(name)
    assert in_viewport(page, "#detail")
    assert in_viewport(page, "#detail h2.tensor-name")
    expect(row).to_have_attribute("aria-current", "true")
    assert page.locator("#tensor-table tbody tr[aria-current=true]").count() == 1
    assert last(page, "tensor") == name and last(page, "sort") == "std" and last(page, "desc") == "true"
    page.screenshot(path=str(shots / "detail-drawer-1366.png"))
    # a click elsewhere on a row selects it too, and the highlight moves
    other = page.locator("#tensor-table tbody tr").nth(2)
    other.locator("td[data-col=mean]").click()
    expect(page.locator("#detail h2.tensor-name")).to_have_text(other.get_attribute("data-tensor"))
    expect(other).to_have_attribute("aria-current", "true")
    expect(row).not_to_have_attribute("aria-current", "true")
    # a tree leaf: its node is selected, and the table row of the same tensor too
    page.click("details[data-path='head'] > summary")
    leaf = page.locator("#tree li[data-tensor='head.weight']")
    leaf.locator("a.leaf").click()
    expect(page.locator("#detail h2.tensor-name")).to_have_text("head.weight")
    expect(leaf).to_have_attribute("aria-selected", "true")
    assert in_viewport(page, "#detail")
    # Esc closes the drawer; the URL drops the tensor and keeps the sort
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).not_to_have_class(re.compile("has-tensor"))
    expect(page.locator("#detail")).to_be_hidden()
    assert not last(page, "tensor") and last(page, "sort") == "std"
    # reloading a pushed URL shows the same selection
    page.goto(f"{base}/checkpoints/{deep}?sort=std&desc=true&tensor={urllib.parse.quote(name)}")
    expect(page.locator(f"#tensor-table tbody tr[data-tensor='{name}']")).to_have_attribute("aria-current", "true")


def test_search_filters_sort_and_page_compose_in_the_url(laptop, site):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}")
    count = page.locator("#tensor-table .table-count")
    expect(count).to_contain_text("368 tensors")
    page.click("#tensor-table th a:has-text('Std')")
    expect(page.locator("#tensor-table th[aria-sort=ascending]")).to_contain_text("Std")
    page.click("#tensor-table th a:has-text('Std')")  # descending
    page.wait_for_url(re.compile(r"desc=true"))
    expect_first(page, ["blocks.7.ff.weight"])  # scaled by 1e6
    # typing a search keeps the sort
    page.fill("input[name=q]", "ff.")
    page.wait_for_url(re.compile(r"q=ff\."))
    expect(count).to_contain_text("120 tensors")
    assert last(page, "sort") == "std" and last(page, "desc") == "true"
    expect_first(page, ["blocks.7.ff.weight"])
    # changing the sort keeps the search
    page.click("#tensor-table th a:has-text('Name')")
    page.wait_for_url(re.compile(r"sort=name"))
    expect(count).to_contain_text("120 tensors")
    assert last(page, "q") == "ff."
    expect_first(page, ["blocks.0.ff.bias", "blocks.0.ff.weight"])
    # page 2 keeps search and sort; a new filter goes back to page 1
    page.click("#tensor-table .pager a[aria-label='Page 2']")
    page.wait_for_url(re.compile(r"page=2"))
    assert last(page, "q") == "ff." and last(page, "sort") == "name"
    expect(page.locator("#tensor-table .pager .current")).to_have_text("2")
    page.check("input[name=nonfinite]")
    expect(count).to_contain_text("1 tensors")
    assert last(page, "page") == "1" and last(page, "q") == "ff." and last(page, "nonfinite") == "true"
    expect_first(page, ["blocks.3.ff.weight"])
    page.uncheck("input[name=nonfinite]")
    page.fill("input[name=q]", "")
    page.select_option("select[name=kind]", "buffer")
    expect(count).to_contain_text("3 tensors")  # bn.running_mean, running_var, num_batches_tracked
    assert last(page, "kind") == "buffer" and last(page, "sort") == "name"
    # the pushed URL is the whole state: it opens as the same page
    page.select_option("select[name=kind]", "")
    page.fill("input[name=q]", "norm")
    page.wait_for_url(re.compile(r"q=norm"))
    page.locator("#tensor-table a.tname").nth(3).click()
    expect(page.locator("#detail h2.tensor-name")).to_have_text(first_names(page, 4)[3])
    url = page.url
    page.goto(url)
    expect(page.locator("input[name=q]")).to_have_value("norm")
    expect(page.locator("#tensor-table th[aria-sort=ascending]")).to_contain_text("Name")
    assert page.locator("#detail h2.tensor-name").inner_text() == first_names(page, 4)[3]


def test_paging_numbers_and_page_size(laptop, site, shots):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}")
    pager = page.locator("#tensor-table .pager")
    assert pager.locator("a.page, .current").all_inner_texts() == ["1", "2", "3", "8"]  # 368 rows / 50
    pager.locator("a[aria-label='Page 8']").click()
    page.wait_for_url(re.compile(r"page=8"))
    expect(page.locator("#tensor-table tbody tr")).to_have_count(18)
    assert pager.locator("a.page, .current").all_inner_texts() == ["1", "6", "7", "8"]
    pager.locator("a.prev").click()
    expect(pager.locator(".current")).to_have_text("7")
    assert pager.locator("a.page, .current").all_inner_texts() == ["1", "5", "6", "7", "8"]
    page.screenshot(path=str(shots / "pager.png"))
    page.select_option("select[name=size]", "100")
    page.wait_for_url(re.compile(r"size=100"))
    expect(page.locator("#tensor-table tbody tr")).to_have_count(100)
    assert last(page, "page") == "1"
    assert pager.locator("a.page, .current").all_inner_texts() == ["1", "2", "3", "4"]
    page.select_option("select[name=size]", "500")
    expect(page.locator("#tensor-table tbody tr")).to_have_count(368)
    expect(pager).to_have_count(0)
    # past the last page: the last page; the page size is bounded by the server
    page.goto(f"{base}/checkpoints/{deep}?page=99&size=250")
    expect(page.locator("#tensor-table .pager .current")).to_have_text("2")
    expect(page.locator("#tensor-table tbody tr")).to_have_count(118)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/checkpoints/{deep}?size=100000", timeout=30)
    assert refused.value.code == 422


def test_tree_state_survives_the_stats_ready_refresh(laptop, site):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}?q=norm")
    page.click("details[data-path='blocks'] > summary")
    page.click("details[data-path='blocks.2'] > summary")
    page.click("details[data-path='blocks.2.ff'] > summary")
    page.check("input[name=module][value='blocks.2.ff.bias']")
    page.click("details[data-path='blocks.4'] > summary")
    page.click("details[data-path='blocks.4.norm'] > summary")
    page.check("input[name=module][value='blocks.4.norm.weight']")
    page.click("details[data-path='blocks.4'] > summary")  # loaded, then closed again: the box is hidden
    page.check("input[name=module][value='embed']")
    page.click("#tensor-table th a:has-text('Max')")
    page.wait_for_url(re.compile(r"sort=max"))
    page.evaluate("() => { document.querySelector('#tree > ul').dataset.old = '1'; }")
    # what the page does when the progress poll answers HX-Trigger: stats-ready
    page.evaluate("() => htmx.trigger(document.body, 'stats-ready')")
    expect(page.locator("#tree > ul:not([data-old])")).to_have_count(1)
    expect(page.locator("#tree > ul[data-old]")).to_have_count(0)
    opened = [("blocks", True), ("blocks.2", True), ("blocks.2.ff", True), ("blocks.4", False), ("blocks.4.norm", True)]
    for path, is_open in [*opened, ("blocks.3", False)]:
        details = page.locator(f"details[data-path='{path}']")
        assert details.evaluate("d => d.open") is is_open, path
        expect(page.locator(f"li[role=treeitem][data-path='{path}']")).to_have_attribute(
            "aria-expanded", "true" if is_open else "false"
        )
    for value in ["blocks.2.ff.bias", "blocks.4.norm.weight", "embed"]:
        expect(page.locator(f"input[name=module][value='{value}']")).to_be_checked()
    expect(page.locator("input[name=module][value='blocks.2.ff.weight']")).not_to_be_checked()
    # the table refreshed with its state: search and sort kept
    assert last(page, "q") == "norm" and last(page, "sort") == "max"
    expect(page.locator("#tensor-table .table-count")).to_contain_text("120 tensors")
    # a module opened for the first time after the refresh still loads its children
    page.click("details[data-path='blocks.9'] > summary")
    page.wait_for_selector("li[role=treeitem][data-path='blocks.9.ff']")


def test_tree_by_keyboard(laptop, site):
    base, deep, _ = site
    page = laptop
    page.goto(f"{base}/checkpoints/{deep}")
    assert page.locator("#tree ul[role=tree]").count() == 1
    top = page.locator("#tree > ul > li[role=treeitem]")
    assert top.count() == 4  # embed, blocks, bn, head
    focused = """() => { const a = document.activeElement, li = a.closest('li[role=treeitem]');
                         return li ? li.dataset.path || li.dataset.tensor : a.outerHTML.slice(0, 120); }"""
    page.locator("li[role=treeitem][data-path='embed']").focus()
    page.keyboard.press("ArrowDown")
    assert page.evaluate(focused) == "blocks"
    page.keyboard.press("ArrowRight")  # opens it
    expect(page.locator("li[data-path='blocks']")).to_have_attribute("aria-expanded", "true")
    page.wait_for_selector("li[role=treeitem][data-path='blocks.0']")
    page.keyboard.press("ArrowRight")  # to its first child
    assert page.evaluate(focused) == "blocks.0"
    page.keyboard.press("ArrowDown")
    assert page.evaluate(focused) == "blocks.1"
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"li[role=treeitem][data-path='blocks.1.{LONG}']")
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == f"blocks.1.{LONG}"
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"li[role=treeitem][data-tensor='blocks.1.{LONG}.bias']")
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == f"blocks.1.{LONG}.weight"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")  # selects the tensor
    expect(page.locator("#detail h2.tensor-name")).to_have_text(f"blocks.1.{LONG}.bias")
    expect(page.locator(f"li[data-tensor='blocks.1.{LONG}.bias']")).to_have_attribute("aria-selected", "true")
    page.keyboard.press("ArrowDown")  # the next module
    assert page.evaluate(focused) == "blocks.1.norm"
    page.keyboard.press(" ")  # a module: Space opens it
    page.wait_for_selector("li[role=treeitem][data-tensor='blocks.1.norm.weight']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press(" ")  # a tensor: Space selects it
    expect(page.locator("#detail h2.tensor-name")).to_have_text("blocks.1.norm.weight")
    page.keyboard.press("ArrowLeft")  # a leaf: to its module
    assert page.evaluate(focused) == "blocks.1.norm"
    page.keyboard.press("ArrowLeft")  # open: closes it
    expect(page.locator("li[data-path='blocks.1.norm']")).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("ArrowLeft")  # closed: to its parent
    assert page.evaluate(focused) == "blocks.1"
    page.keyboard.press("ArrowLeft")
    expect(page.locator("li[data-path='blocks.1']")).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("ArrowDown")  # skips the closed module's children
    assert page.evaluate(focused) == "blocks.2"
    page.keyboard.press("Home")
    assert page.evaluate(focused) == "embed"
    page.keyboard.press("End")
    assert page.evaluate(focused) == "head"
    # the table: a row's link takes the focus and Enter selects it
    link = page.locator("#tensor-table a.tname").nth(5)
    link.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#detail h2.tensor-name")).to_have_text(link.inner_text())
    expect(page.locator("#tensor-table tbody tr").nth(5)).to_have_attribute("aria-current", "true")


def test_half_screen_has_no_horizontal_overflow(browser, site, shots):
    base, deep, other = site
    context, page = open_page(browser, 800, 900)
    try:
        page.goto(f"{base}/checkpoints/{deep}")
        assert page_overflow(page) <= 0
        assert cut_numbers(page) == []
        page.click("details.ops > summary")
        page.click("details[data-path='blocks'] > summary")
        page.click("details[data-path='blocks.0'] > summary")
        page.click("details[data-path='blocks.0.ff'] > summary")
        page.wait_for_selector("li[data-tensor='blocks.0.ff.bias']")
        assert page_overflow(page) <= 0
        page.screenshot(path=str(shots / "checkpoint-800.png"), full_page=True)
        row = page.locator("#tensor-table tbody tr").nth(39)
        row.locator("a.tname").click()
        expect(page.locator("#detail h2.tensor-name")).to_have_text(row.get_attribute("data-tensor"))
        assert in_viewport(page, "#detail")
        assert page_overflow(page) <= 0
        page.screenshot(path=str(shots / "detail-800.png"))
        page.goto(f"{base}/compare?a={other}&b={deep}&show=all")
        expect(page.locator("#diff-counts")).to_be_visible()
        assert page_overflow(page) <= 0
        page.screenshot(path=str(shots / "compare-800.png"), full_page=True)
        page.goto(f"{base}/")
        assert page_overflow(page) <= 0
    finally:
        context.close()
    assert page.errors == [], page.errors
