"""End-to-end: a real uvicorn server on a free loopback port, driven by Debian's chromium."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect

from tests import factories as f
from tests.helpers import database_env, models
from tests.servers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("server") / "data"
    srv = Server(data, database_env())
    yield srv.base
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.fixture
def page(browser, artifacts_dir, request):
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    pg = context.new_page()
    errors: list[str] = []  # JS exceptions and console errors (CSP violations included)
    http_errors: list[str] = []  # 4xx/5xx responses: expected only where a test asks for them
    pg.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg) -> None:
        if msg.type == "error":
            expected = "Failed to load resource" in msg.text or "Response Status Error" in msg.text
            (http_errors if expected else errors).append(msg.text)

    pg.on("console", on_console)
    pg.allow_http_errors = False
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    pg.dialogs = dialogs
    yield pg
    pg.screenshot(path=str(artifacts_dir / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert errors == [], errors
    assert pg.allow_http_errors or http_errors == [], http_errors


def upload_via_form(page, base: str, path: Path) -> None:
    page.goto(base + "/")
    page.set_input_files("#file-input", str(path))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/checkpoints/*", timeout=30000)


def wait_for_stats(page) -> None:
    """The progress component polls itself, then the table reloads with the stats."""
    expect(page.locator("#stats-progress:not(.ok)")).to_have_count(0, timeout=30000)
    expect(page.locator("td.pending")).to_have_count(0, timeout=10000)


def test_upload_expand_tree_open_tensor(server, page, tmp_path, artifacts_dir):
    torch.manual_seed(0)
    model = f.TinyTransformer(layers=4)
    sd = model.state_dict()
    sd["layers.2.linear1.weight"][0, :3] = float("nan")
    path = f.save_torch(sd, tmp_path / "tiny-transformer.pt")
    upload_via_form(page, server, path)

    wait_for_stats(page)
    assert page.locator("h1").inner_text() == "tiny-transformer.pt"
    assert "1 tied" in page.locator(".ckpt-header").inner_text()

    page.click("details[data-path='layers'] > summary")
    layer2 = page.locator("details[data-path='layers.2'] > summary")
    assert "NaN 3" in layer2.inner_text()
    assert "NaN" not in page.locator("details[data-path='layers.1'] > summary").inner_text()
    layer2.click()
    page.click("details[data-path='layers.2.linear1'] > summary")
    page.click("a.leaf[data-tensor='layers.2.linear1.weight']")
    page.wait_for_selector("#detail h2.tensor-name:has-text('layers.2.linear1.weight')")

    detail = page.locator("#detail")
    w = sd["layers.2.linear1.weight"].double()
    finite = w[torch.isfinite(w)]
    assert detail.locator("[data-stat=nan]").inner_text() == "3"
    assert float(detail.locator("[data-stat=mean]").inner_text()) == pytest.approx(finite.mean().item(), rel=1e-4)
    assert float(detail.locator("[data-stat=max]").inner_text()) == pytest.approx(finite.max().item(), rel=1e-4)
    assert detail.locator("figure.histogram svg rect").count() == 64
    assert "tensor=layers.2.linear1.weight" in page.url
    page.screenshot(path=str(artifacts_dir / "checkpoint-page.png"), full_page=True)

    # the pushed URL is a real page
    page.goto(page.url)
    assert page.locator("#detail h2.tensor-name").inner_text() == "layers.2.linear1.weight"


def test_search_sort_filter_and_reload(server, page, tmp_path):
    tensors = {f"blocks.{i}.proj.weight": torch.linspace(-1, 1, 20) * (i + 1) for i in range(30)}
    tensors["blocks.7.norm.running_mean"] = torch.zeros(3)
    upload_via_form(page, server, f.save_safetensors(tensors, tmp_path / "blocks.safetensors"))
    wait_for_stats(page)
    assert "31 tensors" in page.locator("#tensor-table").inner_text()
    table = page.locator("#tensor-table")
    page.fill("input[name=q]", "blocks.2")
    expect(table).to_contain_text("11 tensors")  # blocks.2, blocks.20-29
    assert "q=blocks.2" in page.url
    page.select_option("select[name=kind]", "buffer")
    expect(table).to_contain_text("0 tensors")
    page.select_option("select[name=kind]", "")
    page.fill("input[name=q]", "")
    expect(table).to_contain_text("31 tensors")
    page.click("table.tensors th a:has-text('Std')")
    expect(page.locator("table.tensors th a:has-text('Std')")).to_contain_text("▲")
    page.click("table.tensors th a:has-text('Std')")  # second click: descending
    page.wait_for_url("**desc=true**")
    expect(page.locator("table.tensors tbody tr td.name a").first).to_have_text("blocks.29.proj.weight")
    page.reload()
    assert page.locator("table.tensors tbody tr td.name a").first.inner_text() == "blocks.29.proj.weight"


def test_hostile_names_render_as_text(server, page, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    tensors = {
        evil: torch.ones(2),
        "../../etc/passwd": torch.ones(1),
        "\u202eexe.txt": torch.ones(1),
        "{{ 7*7 }}": torch.ones(1),
    }
    path = f.save_safetensors(tensors, tmp_path / "evil.safetensors", metadata={"note": "<script>alert(2)</script>"})
    upload_via_form(page, server, path)
    wait_for_stats(page)
    text = page.locator("body").inner_text()
    assert evil in text and "{{ 7*7 }}" in text and "../../etc/passwd" in text
    assert "\\u202eexe.txt" in text and "\u202e" not in text  # the override is shown, not obeyed
    assert "49" not in page.locator("#tensor-table").inner_text().replace("1.49", "")
    page.click("details.meta summary")
    assert "<script>alert(2)</script>" in page.locator("details.meta").inner_text()
    assert page.locator("img[src=x]").count() == 0 and page.locator("main script").count() == 0
    page.click(f"table.tensors td.name a:text-is('{evil}')")
    page.wait_for_selector("#detail h2.tensor-name")
    assert page.locator("#detail h2.tensor-name").inner_text() == evil
    assert page.dialogs == []


def test_bad_upload_shows_readable_error(server, page, tmp_path):
    page.allow_http_errors = True
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    page.goto(server + "/")
    page.set_input_files("#file-input", str(junk))
    page.click("#upload-form button[type=submit]")
    message = page.wait_for_selector("#upload-result .message.error")
    assert "unrecognised file" in message.inner_text()
    assert "Traceback" not in page.content()
    page.goto(server + "/checkpoints/does-not-exist")
    assert "no checkpoint with id" in page.locator(".message.error").inner_text()


def test_nested_checkpoint_root_switch_and_delete(server, page, tmp_path):
    upload_via_form(page, server, f.training_checkpoint(tmp_path / "trainer-last.ckpt"))
    assert "11 tensors" in page.locator("#tensor-table").inner_text()
    page.select_option("select[name=root]", "optimizer.state")
    page.click("form.roots button")
    page.wait_for_url("**root=optimizer.state**")
    page.wait_for_selector("table.tensors >> text=0.exp_avg_sq")
    page.goto(server + "/")
    row = page.locator("#checkpoint-list tr:has-text('trainer-last.ckpt')")
    row.locator("button:has-text('Delete')").click()
    expect(page.locator("#checkpoint-list")).not_to_contain_text("trainer-last.ckpt")
    assert page.dialogs == ["Delete this checkpoint?"]


def test_swagger_ui_is_self_hosted(server, page):
    page.goto(server + "/docs")
    expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=20000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any(p.replace("\u200b", "") == "/api/v1/checkpoints" for p in paths), paths


def _api(server: str, path: str) -> bytes:
    with urllib.request.urlopen(server + path, timeout=30) as r:
        return r.read()


def test_copy_freeze_export_and_compare_in_the_browser(server, page, tmp_path):
    import copy
    import io
    import json

    a, b = models()
    upload_via_form(page, server, f.save_torch(b.state_dict(), tmp_path / "target-b.pt"))
    target_id = page.url.rsplit("/", 1)[-1]
    upload_via_form(page, server, f.save_torch(a.state_dict(), tmp_path / "source-a.pt"))
    source_url = page.url

    page.click("details.ops > summary")
    page.check("input[name=module][value=nn_same]")
    page.select_option("select[name=target]", target_id)
    page.click("button[value=preview]")
    expect(page.locator("#ops-result")).to_contain_text("9 copied · 0 missing · 0 unexpected")
    page.click("button[value=copy]")
    page.wait_for_url(lambda url: url != source_url and "/checkpoints/" in url)
    expect(page.locator("h1")).to_have_text("target-b.copy.pt")
    copied_id = page.url.rsplit("/", 1)[-1]
    got = torch.load(io.BytesIO(_api(server, f"/api/v1/checkpoints/{copied_id}/download")), weights_only=True)
    expected = copy.deepcopy(b)
    expected.nn_same.load_state_dict(a.nn_same.state_dict())
    for k, v in expected.state_dict().items():
        assert torch.equal(got[k], v), k

    page.goto(source_url)
    page.click("details.ops > summary")
    page.check("input[name=module][value=nn_same]")
    page.click("text=Freeze plan")
    expect(page.locator("#ops-result")).to_contain_text("6 parameter tensors frozen")
    assert "requires_grad_(False)" in page.locator("#ops-result pre.snippet").first.inner_text()

    page.uncheck("input[name=module][value=nn_same]")
    page.check("input[name=module][value=head]")
    page.select_option("select[name=format]", "safetensors")
    page.click("text=Export selection")
    page.wait_for_url(lambda url: url != source_url and "/checkpoints/" in url)
    expect(page.locator("h1")).to_have_text("source-a.export.safetensors")
    assert "2 tensors" in page.locator(".ckpt-header").inner_text()

    page.goto(f"{server}/compare?a={target_id}&b={copied_id}")
    expect(page.locator("#diff-counts")).to_contain_text("changed")
    assert "changed" in page.locator("details[data-path='nn_same'] > summary").inner_text()
    assert "identical" in page.locator("details[data-path='head'] > summary").inner_text()
    diff = json.loads(_api(server, f"/api/v1/diff?a={target_id}&b={copied_id}"))
    assert diff["counts"]["identical"] + diff["counts"]["changed"] == len(b.state_dict())


def test_operation_errors_are_shown_in_the_page(server, page, tmp_path):
    page.allow_http_errors = True
    upload_via_form(page, server, f.save_torch(f.cnn_state_dict(), tmp_path / "lonely.pt"))
    page.click("details.ops > summary")
    page.click("text=Freeze plan")
    expect(page.locator("#ops-result .message.error")).to_contain_text("tick at least one module")
