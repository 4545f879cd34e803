"""Downloads, names and telling checkpoints apart (issue 14).

The browser tests drive a real server that needs a token (``CKPTSCOPE_API_TOKEN``): the browser logs
in with the form, so every download link is shown to work with the session cookie alone. The
page-level checks that need no browser use the in-process app."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect

from ckptscope.units import human_bytes
from tests import factories as f
from tests.helpers import csrf_token, database_env, models, upload
from tests.servers import Server

TOKEN = "downloads-identity-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- pages, in process ---------------------------------------------------------------------------


def test_header_counts_parameters_per_dtype_once_per_tied_storage(client, tmp_path):
    embed = torch.randn(10, 4)
    sd = {"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    cid = upload(client, f.save_torch(sd, tmp_path / "tied.pt")).json()["id"]
    header = client.get(f"/checkpoints/{cid}").text.split("</header>")[0]
    assert "F32 40 · BF16 4 params" in header  # lm_head ties embed: its 40 values count once
    assert "showing root" not in header  # one root: nothing to say


def test_header_says_which_root_of_a_nested_checkpoint_is_shown(client, tmp_path):
    cid = upload(client, f.training_checkpoint(tmp_path / "last.ckpt")).json()["id"]
    roots = client.get(f"/api/v1/checkpoints/{cid}").json()["roots"]
    assert len(roots) > 1
    header = client.get(f"/checkpoints/{cid}").text.split("</header>")[0]
    assert f"showing root <code>state_dict</code> of {len(roots)}" in header
    other = next(r["path"] for r in roots if r["path"] not in ("state_dict", ""))
    header = client.get(f"/checkpoints/{cid}", params={"root": other}).text.split("</header>")[0]
    assert f"showing root <code>{other}</code> of {len(roots)}" in header
    whole = client.get(f"/checkpoints/{cid}", params={"root": ""}).text.split("</header>")[0]
    assert f"showing root <code>(whole file)</code> of {len(roots)}" in whole


def test_compare_starts_empty_and_takes_the_two_ticked(client, tmp_path):
    old = upload(client, f.save_safetensors({"w": torch.zeros(3)}, tmp_path / "a.safetensors"), "m.safetensors")
    new = upload(client, f.save_safetensors({"w": torch.ones(3)}, tmp_path / "b.safetensors"), "m.safetensors")
    old, new = old.json(), new.json()
    page = client.get("/compare").text
    assert 'id="diff-counts"' not in page
    assert page.count('<option value="" selected>') == 2  # neither A nor B is guessed
    for body in (old, new):  # same names: size, date and short sha tell them apart
        assert f"m.safetensors · {body['size_bytes']} B · " in page and body["sha256"][:8] in page
    home = client.get("/").text
    assert "/compare?a=" not in home and 'name="pick"' in home and "Compare selected" in home
    picked = client.get("/compare", params=[("pick", new["id"]), ("pick", old["id"])]).text
    assert 'id="diff-counts"' in picked
    assert f'<option value="{old["id"]}" selected>' in picked.split('name="b"')[0]  # the older one is A
    assert f'<option value="{new["id"]}" selected>' in picked.split('name="b"')[1]
    one = client.get("/compare", params={"pick": old["id"]}).text
    assert "tick exactly two checkpoints" in one and 'id="diff-counts"' not in one


def test_export_from_the_ui_lands_on_a_success_message(client, tmp_path):
    cid = upload(client, f.save_torch(f.cnn_state_dict(), tmp_path / "cnn.pt")).json()["id"]
    form = {"module": "features", "csrf_token": csrf_token(client), "format": "safetensors"}
    r = client.post(f"/checkpoints/{cid}/export", data=form, follow_redirects=False)
    new_id = r.headers["location"].rsplit("/", 1)[-1]
    assert r.status_code == 303 and r.headers["location"] == f"/checkpoints/{new_id}"  # the page's own URL
    assert f"Path=/checkpoints/{new_id}" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    page = client.get(r.headers["location"]).text
    message = page.split('id="created-message"')[1].split("</div>")[0]
    assert "Exported 9 tensors from cnn.pt" in message
    assert f'href="/api/v1/checkpoints/{new_id}/download"' in message
    assert 'id="created-message"' not in client.get(f"/checkpoints/{new_id}").text  # only right after


def test_copy_from_the_ui_lands_on_a_success_message(client, tmp_path):
    a, b = models()
    src = upload(client, f.save_torch(a.state_dict(), tmp_path / "src.pt")).json()["id"]
    dst = upload(client, f.save_torch(b.state_dict(), tmp_path / "dst.pt")).json()["id"]
    form = {"module": "nn_same", "target": dst, "action": "copy", "strict": "true", "csrf_token": csrf_token(client)}
    r = client.post(f"/checkpoints/{src}/copy", data=form, headers={"hx-request": "true"})
    assert r.status_code == 200 and r.headers["hx-redirect"].startswith("/checkpoints/")
    page = client.get(r.headers["hx-redirect"]).text
    message = page.split('id="created-message"')[1].split("</div>")[0]
    assert "Copied 9 tensors from src.pt into dst.pt" in message and "/download" in message


# --- in the browser ------------------------------------------------------------------------------

e2e = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("identity") / "data"
    srv = Server(data, {**database_env(), "CKPTSCOPE_API_TOKEN": TOKEN})
    yield srv
    assert srv.terminate()
    assert "Traceback" not in srv.log()


@pytest.fixture
def page(browser, server, artifacts_dir, request):
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.goto(server.base + "/login")
    pg.fill("input[name=token]", TOKEN)
    pg.click("form[action='/login'] button[type=submit]")
    pg.wait_for_url(server.base + "/")
    yield pg
    pg.screenshot(path=str(artifacts_dir / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert errors == [], errors


def api_bytes(server: Server, path: str) -> bytes:
    req = urllib.request.Request(server.base + path, headers=BEARER)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def upload_in_browser(page, base: str, paths: list[Path], name: str = "") -> str:
    page.goto(base + "/")
    if name:
        page.fill("#upload-form input[name=name]", name)
    page.set_input_files("#file-input", [str(p) for p in paths])
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/checkpoints/*", timeout=30000)
    return page.url.rsplit("/", 1)[-1].split("?")[0]


def download(page, link) -> tuple[str, bytes]:
    with page.expect_download() as info:
        link.click()
    got = info.value
    return got.suggested_filename, Path(got.path()).read_bytes()


@e2e
def test_download_a_file_and_every_file_of_a_sharded_set(server, page, tmp_path):
    single = f.save_safetensors({"w": torch.randn(8, 8)}, tmp_path / "tiny.safetensors")
    upload_in_browser(page, server.base, [single], name="my tiny model")
    expect(page.locator("h1")).to_have_text("my tiny model")
    link = page.locator(".ckpt-actions a.download")
    expect(link).to_contain_text(human_bytes(single.stat().st_size))
    filename, data = download(page, link)
    assert sha256(data) == sha256(single.read_bytes()) and filename == "tiny.safetensors"

    shards = tmp_path / "sharded"
    shards.mkdir()
    index = f.sharded_safetensors(shards, f.cnn_state_dict(), shards=2)
    files = [index, *sorted(shards.glob("model-*.safetensors"))]
    upload_in_browser(page, server.base, files)
    page.click(".ckpt-actions details.downloads > summary")
    links = page.locator(".ckpt-actions details.downloads a.download")
    expect(links).to_have_count(3)
    for p in files:
        link = links.filter(has_text=p.name)
        expect(link.locator("xpath=..")).to_contain_text(human_bytes(p.stat().st_size))
        filename, data = download(page, link)
        assert filename == p.name and sha256(data) == sha256(p.read_bytes()), p.name


@e2e
def test_export_message_links_the_new_file(server, page, tmp_path):
    upload_in_browser(page, server.base, [f.save_torch(f.cnn_state_dict(), tmp_path / "cnn.pt")])
    source = page.url
    page.click("details.ops > summary")
    page.check("input[name=module][value=head]")
    page.click("text=Export selection")
    page.wait_for_url(lambda url: url != source and "/checkpoints/" in url)
    message = page.locator("#created-message")
    expect(message).to_contain_text("Exported 2 tensors from cnn.pt · Download")
    new_id = page.url.rsplit("/", 1)[-1]
    _, data = download(page, message.locator("a", has_text="Download"))
    assert data == api_bytes(server, f"/api/v1/checkpoints/{new_id}/download")
    assert sha256(data) == server_sha(server, new_id)
    page.reload()  # said once
    expect(page.locator("h1")).to_have_text("cnn.export.safetensors")
    expect(page.locator("#created-message")).to_have_count(0)


def server_sha(server: Server, checkpoint_id: str) -> str:
    status, body = server.request("GET", f"/api/v1/checkpoints/{checkpoint_id}", headers=BEARER)
    assert status == 200
    return body["files"][0]["sha256"]


@e2e
def test_rename_shows_everywhere_and_compare_picks_are_told_apart(server, page, tmp_path):
    a = f.save_torch({"w": torch.zeros(4)}, tmp_path / "a.pt")
    b = f.save_torch({"w": torch.ones(4)}, tmp_path / "b.pt")
    ids = []
    for p in (a, b):  # two different checkpoints, both called same.pt
        status, body = server.request(
            "POST", "/api/v1/checkpoints?filename=same.pt", p.read_bytes(), {**BEARER, "Content-Type": "x/y"}
        )
        assert status == 201, body
        ids.append(body["id"])
    old, new = ids
    sha = {cid: server_sha(server, cid)[:8] for cid in ids}

    page.goto(f"{server.base}/checkpoints/{old}")
    page.click(".ckpt-actions details.rename > summary")
    page.fill(".rename-form input[name=name]", "baseline (zeros)")
    page.click(".rename-form button[type=submit]")
    expect(page.locator("h1")).to_have_text("baseline (zeros)")

    page.goto(server.base + "/")
    expect(page.locator(f"tr[data-id='{old}']")).to_contain_text("baseline (zeros)")
    expect(page.locator(f"tr[data-id='{old}']")).to_contain_text(sha[old])
    expect(page.locator(f"tr[data-id='{new}']")).to_contain_text("same.pt")
    expect(page.locator(f"tr[data-id='{new}']")).to_contain_text(sha[new])

    page.goto(f"{server.base}/checkpoints/{new}")  # the copy target names the renamed one
    target = page.locator(f"select[name=target] option[value='{old}']")
    text = target.text_content() or ""
    assert text.startswith("baseline (zeros) · ") and text.endswith(sha[old]), text

    page.goto(server.base + "/compare")  # starts empty, options tell the two apart
    assert page.locator("select[name=a]").input_value() == "" == page.locator("select[name=b]").input_value()
    options = page.locator("select[name=a] option").all_text_contents()
    assert any(o.startswith("baseline (zeros) · ") and sha[old] in o for o in options), options
    assert any(o.startswith("same.pt · ") and sha[new] in o for o in options), options
    expect(page.locator("#diff-counts")).to_have_count(0)

    page.goto(server.base + "/")
    page.check(f"tr[data-id='{old}'] input[name=pick]")
    page.check(f"tr[data-id='{new}'] input[name=pick]")
    page.click("#compare-picks button[type=submit]")
    expect(page.locator("#diff-counts")).to_contain_text("changed 1")
    assert page.locator("select[name=a]").input_value() == old and page.locator("select[name=b]").input_value() == new
