"""Previews and spectra over REST (PNG, ETag, problem+json, OpenAPI, the spectrum cache) and the
UI's fragments (_preview.html), through FastAPI's TestClient on a real catalogue."""

from __future__ import annotations

import io
import math
import re
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ckptscope.insights import png
from tests import factories as f
from tests.helpers import upload
from tests.web.conftest import browser  # noqa: F401  (the chromium fixture)

NAMES = {
    "encoder/layers.0.attn.q.weight": (24, 20),  # a slash and dots in the name
    "conv.weight": (6, 2, 3, 3),
    "bias": (9,),
    "odd ?#%&name": (3, 4),  # characters that mean something in a URL
}


@pytest.fixture
def ckpt(client, tmp_path):
    f.seeded(5)
    sd = {name: torch.randn(shape) for name, shape in NAMES.items()}
    sd["scalar"] = torch.tensor(2.0)
    sd["nan"] = torch.tensor([[math.nan, 1.0], [2.0, 3.0]])
    r = upload(client, f.save_safetensors(sd, tmp_path / "m.safetensors"))
    assert r.status_code == 201, r.text
    return r.json()["id"], sd


def url(ckpt_id: str, name: str, tail: str) -> str:
    return f"/api/v1/checkpoints/{ckpt_id}/tensors/{quote(name, safe='/')}/{tail}"


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_preview_png_of_a_slashed_dotted_name(client, ckpt):
    ckpt_id, sd = ckpt
    name = "encoder/layers.0.attn.q.weight"
    r = client.get(url(ckpt_id, name, "preview.png"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert "private" in r.headers["cache-control"] and r.headers["etag"]
    img = decode(r.content)
    assert img.shape[1::-1] == png.heatmap_size(24, 20)
    # the cell of the largest |value| is a map end; the tensor's cells are one value each
    w = sd[name]
    i, j = divmod(int(w.abs().argmax()), 20)
    scale = png.cell_scale(24, 20)
    pixel = tuple(img[png.MARGIN + i * scale, png.MARGIN + j * scale])
    assert pixel == (png.RED if w[i, j] > 0 else png.BLUE)
    again = client.get(url(ckpt_id, name, "preview.png"), headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    other = client.get(url(ckpt_id, name, "preview.png"), params={"reduce": "absmax"})
    assert other.status_code == 200 and other.headers["etag"] != r.headers["etag"]


def test_preview_options_slices_and_lines(client, ckpt):
    ckpt_id, sd = ckpt
    conv = client.get(url(ckpt_id, "conv.weight", "preview.png"), params={"index": "1,0"})
    assert conv.status_code == 200
    assert decode(conv.content).shape[1::-1] == png.heatmap_size(3, 3)
    line = client.get(url(ckpt_id, "bias", "preview.png"))
    assert line.status_code == 200 and decode(line.content).shape[1::-1] == png.line_size()
    odd = client.get(url(ckpt_id, "odd ?#%&name", "preview.png"))
    assert odd.status_code == 200


@pytest.mark.parametrize(
    ("name", "params", "status", "fragment"),
    [
        ("scalar", {}, 422, "0-d"),
        ("conv.weight", {"index": "9"}, 422, "out of range"),
        ("conv.weight", {"index": "a,b"}, 422, "index"),
        ("conv.weight", {"reduce": "median"}, 422, "reduce"),
        ("missing", {}, 404, "missing"),
    ],
)
def test_preview_problems(client, ckpt, name, params, status, fragment):
    ckpt_id, _ = ckpt
    r = client.get(url(ckpt_id, name, "preview.png"), params=params)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/problem+json")
    assert fragment in r.text


def test_spectrum_json_and_its_cache(client, ckpt, data_dir):
    ckpt_id, sd = ckpt
    name = "encoder/layers.0.attn.q.weight"
    r = client.get(url(ckpt_id, name, "spectrum"))
    assert r.status_code == 200, r.text
    body = r.json()
    want = torch.linalg.svdvals(sd[name]).double().numpy()
    assert body["name"] == name and body["shape"] == [24, 20] and body["count"] == 20
    np.testing.assert_allclose(body["values"], want, rtol=1e-5)
    s = want
    assert body["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5)
    assert body["cached"] is False
    cached = list((data_dir / "spectra").rglob("*.json"))
    assert len(cached) == 1 and not list((data_dir / "spectra").rglob("*.tmp"))
    again = client.get(url(ckpt_id, name, "spectrum")).json()
    assert again["cached"] is True and again["values"] == body["values"]
    cached[0].write_text("{not json")  # a damaged entry is computed again
    assert client.get(url(ckpt_id, name, "spectrum")).json()["cached"] is False
    conv = client.get(url(ckpt_id, "conv.weight", "spectrum")).json()
    assert conv["shape"] == [6, 18]


def test_deleting_the_last_checkpoint_of_a_content_removes_its_cached_spectra(client, data_dir, tmp_path):
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.randn(8, 6)}, str(path))
    first = client.post("/api/v1/checkpoints", files={"file": ("one.safetensors", path.read_bytes())}).json()
    second = client.post("/api/v1/checkpoints", files={"file": ("again.safetensors", path.read_bytes())}).json()
    assert client.get(url(first["id"], "w", "spectrum")).status_code == 200
    assert list((data_dir / "spectra").rglob("*.json"))
    assert client.delete(f"/api/v1/checkpoints/{first['id']}").status_code == 204
    assert list((data_dir / "spectra").rglob("*.json"))  # the same content is still listed
    assert client.delete(f"/api/v1/checkpoints/{second['id']}").status_code == 204
    assert not list((data_dir / "spectra").rglob("*.json"))


@pytest.mark.parametrize(("name", "fragment"), [("bias", "1-d"), ("nan", "NaN"), ("scalar", "0-d")])
def test_spectrum_problems(client, ckpt, name, fragment):
    ckpt_id, _ = ckpt
    r = client.get(url(ckpt_id, name, "spectrum"))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert fragment in r.json()["detail"]


def test_both_routes_are_in_openapi_and_tensor_detail_still_works(client, ckpt):
    ckpt_id, _ = ckpt
    paths = client.get("/openapi.json").json()["paths"]
    preview = paths["/api/v1/checkpoints/{checkpoint_id}/tensors/{name}/preview.png"]["get"]
    assert "image/png" in preview["responses"]["200"]["content"]
    assert {p["name"] for p in preview["parameters"]} >= {"root", "reduce", "index"}
    spectrum = paths["/api/v1/checkpoints/{checkpoint_id}/tensors/{name}/spectrum"]["get"]
    schema = spectrum["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert schema.endswith("/SpectrumOut")
    detail = client.get(f"/api/v1/checkpoints/{ckpt_id}/tensors/encoder/layers.0.attn.q.weight")
    assert detail.status_code == 200 and detail.json()["shape"] == [24, 20]


# --- the UI's fragments -------------------------------------------------------------------------


def test_preview_fragment_image_toggle_and_spectrum(client, ckpt):
    ckpt_id, _ = ckpt
    name = "odd ?#%&name"
    r = client.get(f"/checkpoints/{ckpt_id}/preview", params={"tensor": name}, headers={"HX-Request": "true"})
    assert r.status_code == 200
    html = r.text
    img = re.search(r'<img class="preview-image" src="([^"]+)" width="(\d+)" height="(\d+)" alt="([^"]+)"', html)
    assert img is not None, html
    src = img.group(1).replace("&amp;", "&")
    assert (int(img.group(2)), int(img.group(3))) == png.heatmap_size(3, 4)
    assert "heatmap" in img.group(4)
    picture = client.get(src)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert decode(picture.content).shape[1::-1] == png.heatmap_size(3, 4)
    assert 'data-reduce-link="absmax"' in html  # the toggle offers the other reduce
    assert "odd ?#%&name" not in html  # the name is escaped or encoded wherever it appears
    button = re.search(r'hx-get="(/checkpoints/[^"]+/spectrum\?[^"]+)"', html)
    assert button is not None
    fragment = client.get(button.group(1).replace("&amp;", "&"), headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    assert 'data-stat="stable_rank"' in fragment.text and "<polyline" in fragment.text


def test_preview_fragment_explains_tensors_without_one(client, ckpt):
    ckpt_id, _ = ckpt
    r = client.get(f"/checkpoints/{ckpt_id}/preview", params={"tensor": "scalar"})
    assert r.status_code == 200 and 'data-preview="none"' in r.text and "0-d" in r.text
    bias = client.get(f"/checkpoints/{ckpt_id}/preview", params={"tensor": "bias"}).text
    assert 'data-kind="line"' in bias and 'data-spectrum="none"' in bias and "1-d" in bias
    spectrum = client.get(f"/checkpoints/{ckpt_id}/spectrum", params={"tensor": "nan"}).text
    assert 'data-spectrum="none"' in spectrum and "NaN" in spectrum


# --- in a real browser: the detail panel loads the preview, toggles it, fetches the spectrum ----


@pytest.mark.e2e
def test_detail_panel_preview_in_chromium(tmp_path, browser, artifacts_dir):  # noqa: F811 (the fixture)
    import json
    import urllib.request

    from tests.helpers import database_env
    from tests.servers import Server

    f.seeded(6)
    path = f.save_safetensors({"enc/blk.0.w": torch.randn(40, 30), "v": torch.randn(50)}, tmp_path / "p.safetensors")
    srv = Server(tmp_path / "data", database_env())
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        request = urllib.request.Request(
            srv.base + "/api/v1/checkpoints?filename=p.safetensors",
            data=path.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request) as r:
            ckpt_id = json.loads(r.read())["id"]
        page.goto(f"{srv.base}/checkpoints/{ckpt_id}?tensor={quote('enc/blk.0.w')}")
        image = page.locator("#tensor-preview img.preview-image")
        image.wait_for(timeout=20000)
        page.wait_for_function(
            "() => { const i = document.querySelector('#tensor-preview img');"
            " return i && i.complete && i.naturalWidth > 0 }",
            timeout=20000,
        )
        width, height = png.heatmap_size(40, 30)
        assert page.evaluate("() => document.querySelector('#tensor-preview img').naturalWidth") == width
        assert image.get_attribute("width") == str(width) and image.get_attribute("height") == str(height)
        assert "heatmap" in (image.get_attribute("alt") or "")
        page.click("[data-reduce-link=absmax]")
        page.wait_for_selector("#tensor-preview img[data-reduce=absmax]", timeout=20000)
        page.click("#tensor-preview .spectrum-button")
        page.wait_for_selector("#tensor-spectrum [data-stat=stable_rank]", timeout=30000)
        assert page.locator("#tensor-spectrum polyline").count() == 1
        page.screenshot(path=str(artifacts_dir / "preview_detail_panel.png"), full_page=True)
    finally:
        context.close()
        assert srv.terminate()
    assert errors == [], errors
    assert "Traceback" not in srv.log()
