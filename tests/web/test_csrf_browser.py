"""The browser side of the CSRF defences, in Debian's chromium against a real server.

The UI's own requests carry the anti-CSRF token (htmx through ``hx-headers`` on ``<body>``, plain
forms through a hidden field); a page on another origin of the *same site* (another port of
127.0.0.1, where SameSite cookies still go along) can change nothing, by form or by fetch; and a
same-origin script that leaves the token out is refused too."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests import factories as f
from tests.helpers import database_env
from tests.servers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("csrf") / "data", database_env())
    yield srv
    assert srv.terminate()
    assert "Traceback" not in srv.log()


def ids(server: Server) -> list[str]:
    return sorted(c["id"] for c in server.get("/api/v1/checkpoints?limit=1000")["items"])


def files(data_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(data_dir))
        for sub in ("tmp", "blobs", "pins")
        for p in (data_dir / sub).rglob("*")
        if p.is_file()
    )


def test_the_ui_sends_its_token_with_htmx_and_with_plain_forms(server, browser, tmp_path):
    path = f.save_safetensors({"enc.w": torch.randn(4, 4), "head.w": torch.randn(2)}, tmp_path / "ui.safetensors")
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(server.base + "/")
    cookie = next(c for c in ctx.cookies() if c["name"] == "ckptscope_csrf")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"  # scripts cannot read it; the page carries it
    assert json.loads(page.get_attribute("body", "hx-headers")) == {"X-CSRF-Token": cookie["value"]}
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("x-csrf-token")) if r.method != "GET" else None)
    page.set_input_files("#file-input", str(path))
    page.click("#upload-form button[type=submit]")  # htmx
    page.wait_for_url("**/checkpoints/*", timeout=30000)
    assert sent == [cookie["value"]]
    cid = page.url.rsplit("/", 1)[1]
    page.goto(server.base + "/")
    page.on("dialog", lambda d: d.accept())
    page.click(f"#checkpoint-list button[hx-delete='/checkpoints/{cid}']")  # htmx delete
    page.wait_for_selector(f"#checkpoint-list a[href='/checkpoints/{cid}']", state="detached")
    assert sent == [cookie["value"]] * 2 and cid not in ids(server)
    ctx.close()

    plain = browser.new_context(java_script_enabled=False)  # no htmx: the form's hidden field
    page = plain.new_page()
    page.goto(server.base + "/")
    page.set_input_files("#file-input", str(path))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/checkpoints/*", timeout=30000)
    assert page.locator("h1").inner_text() == "ui.safetensors"
    plain.close()


def _attack_page(target: str, cid: str) -> str:
    """Forms and fetches a hostile page on another port of the same host would send."""
    copy = json.dumps({"source": cid, "target": cid, "mapping": {"enc": "head"}, "strict": False})
    name, value = copy[:-2] + ', "x": "', '"}'  # a text/plain form body that is JSON
    return f"""<!doctype html><html><body>
<form id="upload" method="post" action="{target}/upload" enctype="multipart/form-data">
  <input name="csrf_token" value="a-guess-of-the-token-aaaaaaaaaaaaaaaaaaaaaaaaa"><button>go</button></form>
<form id="export" method="post" action="{target}/checkpoints/{cid}/export">
  <input name="module" value="enc"><input name="csrf_token" value="a-guess"><button>go</button></form>
<form id="api-copy" method="post" action="{target}/api/v1/copy" enctype="text/plain">
  <input name='{name}' value='{value}'><button>go</button></form>
<form id="api-delete" method="post" action="{target}/api/v1/checkpoints/{cid}?_method=DELETE"><button>go</button></form>
</body></html>"""


def test_another_origin_of_the_same_site_can_change_nothing(server, browser, tmp_path):
    path = f.save_safetensors(
        {"enc.w": torch.randn(4, 4), "head.w": torch.randn(4, 4)}, tmp_path / "victim.safetensors"
    )
    cid = server.upload(path)["id"]
    before_ids, before_files = ids(server), files(server.data_dir)
    with _serve(_attack_page(server.base, cid).encode()) as evil:  # the same site (127.0.0.1), another origin
        _attack(server, browser, cid, evil)
    assert ids(server) == before_ids and files(server.data_dir) == before_files
    assert server.request("GET", "/readyz")[0] == 200


class _serve:
    """A real HTTP server on another loopback port serving one page: a real local origin, whose
    requests Chromium's local-network checks let reach the service, as an attacker's would."""

    def __init__(self, page: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _attack(server: Server, browser, cid: str, evil: str) -> None:
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(server.base + "/")  # the victim has visited the service: its cookies exist
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    for form in ("upload", "export", "api-copy", "api-delete"):
        page.goto(f"{evil}/attack")
        with page.expect_navigation() as nav:
            page.click(f"#{form} button")
        response = nav.value
        assert response is not None and response.status == 403, form
        text = page.locator("body").inner_text()
        assert "cross_origin" in text or "another site or origin" in text, (form, text[:300])
    page.goto(f"{evil}/attack")
    statuses = page.evaluate(
        """async ([base, cid]) => {
            const data = new FormData();
            data.append("file", new Blob([new Uint8Array(64)]), "x.safetensors");
            const opts = {method: "POST", mode: "no-cors", credentials: "include"};
            const sent = [
                fetch(base + "/upload", {...opts, body: data}),
                fetch(base + "/api/v1/checkpoints", {...opts, body: data}),
                fetch(base + "/api/v1/copy", {...opts, body: JSON.stringify({source: cid, target: cid, mapping: {}})}),
            ];
            return (await Promise.all(sent)).map(r => r.type);
        }""",
        [server.base, cid],
    )
    assert statuses == ["opaque"] * 3  # sent, and the page learns nothing
    assert len(posts) == 7 and all(url.startswith(server.base) for url in posts), posts
    ctx.close()


def test_a_same_origin_script_without_the_token_is_refused(server, browser, tmp_path):
    path = f.save_safetensors({"enc.w": torch.randn(3), "head.w": torch.randn(3)}, tmp_path / "own.safetensors")
    cid = server.upload(path)["id"]
    before = ids(server)
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"{server.base}/checkpoints/{cid}")
    results = page.evaluate(
        """async (cid) => {
            const form = () => new URLSearchParams({module: "enc"});
            const token = JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRF-Token"];
            const without = await fetch(`/checkpoints/${cid}/export`, {method: "POST", body: form()});
            const post = (path, headers) => fetch(path, {method: "POST", body: form(), headers: headers});
            const wrong = await post(`/checkpoints/${cid}/export`, {"X-CSRF-Token": "x".repeat(43)});
            const del = await fetch(`/checkpoints/${cid}`, {method: "DELETE"});
            const right = await post(`/checkpoints/${cid}/freeze`, {"X-CSRF-Token": token});
            const said = (await without.text()).includes("anti-CSRF");
            return [without.status, wrong.status, del.status, right.status, said];
        }""",
        cid,
    )
    assert results == [403, 403, 403, 200, True]
    assert ids(server) == before
    ctx.close()
