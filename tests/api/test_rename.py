"""PATCH /api/v1/checkpoints/{id}: a checkpoint's name (label), its rules, auth and CSRF; the
upload's `name` field under the same rules; the UI's rename route."""

from __future__ import annotations

import pytest
import torch

from tests import factories as f
from tests.helpers import csrf_token, make_client, upload

TOKEN = "rename-test-token"


@pytest.fixture
def ckpt(client, tmp_path) -> str:
    path = f.save_safetensors({"w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    return upload(client, path).json()["id"]


def name_of(client, checkpoint_id: str) -> str:
    return client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()["name"]


def test_rename_sets_the_label_everywhere_and_keeps_id_content_and_files(client, ckpt, tmp_path):
    before = client.get(f"/api/v1/checkpoints/{ckpt}").json()
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "  baseline run 3/final  "})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "baseline run 3/final"  # trimmed; a slash is label text, not a path
    assert body["id"] == ckpt and body["sha256"] == before["sha256"] and body["size_bytes"] == before["size_bytes"]
    after = client.get(f"/api/v1/checkpoints/{ckpt}").json()
    assert after["name"] == "baseline run 3/final" and after["files"] == before["files"]
    assert [c["name"] for c in client.get("/api/v1/checkpoints").json()["items"]] == ["baseline run 3/final"]
    # the label is not a file name: the download keeps the file's own name (and its bytes)
    d = client.get(f"/api/v1/checkpoints/{ckpt}/download")
    assert d.status_code == 200 and d.content == (tmp_path / "model.safetensors").read_bytes()
    assert 'filename="model.safetensors"' in d.headers["content-disposition"]
    # a label that is a file name of the same kind names the download
    client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "best.safetensors"})
    assert (
        'filename="best.safetensors"'
        in client.get(f"/api/v1/checkpoints/{ckpt}/download").headers["content-disposition"]
    )


def test_two_checkpoints_of_one_content_have_their_own_labels(client, ckpt, tmp_path):
    other = upload(client, tmp_path / "model.safetensors").json()["id"]  # the same bytes again
    client.patch(f"/api/v1/checkpoints/{other}", json={"name": "copy B"})
    assert name_of(client, ckpt) == "model.safetensors" and name_of(client, other) == "copy B"


def test_unknown_id_is_404(client, ckpt):
    r = client.patch("/api/v1/checkpoints/nope", json={"name": "x"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "   "},  # nothing left once trimmed
        {"name": "\n\t"},
        {"name": "x" * 201},
        {"name": 5},
        {"name": None},
        {"name": ["a"]},
        {"name": {"a": 1}},
        {},
        {"name": "ok", "extra": 1},
        [],
    ],
    ids=repr,
)
def test_invalid_names_are_422_and_change_nothing(client, ckpt, body):
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert name_of(client, ckpt) == "model.safetensors"


def test_not_json_is_422(client, ckpt):
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", content=b"name=x", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and name_of(client, ckpt) == "model.safetensors"


def test_200_characters_are_allowed(client, ckpt):
    assert client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "é" * 200}).json()["name"] == "é" * 200


def test_a_nul_counts_as_one_character_as_the_schema_says(client, ckpt):
    """The schema's maxLength is the user's characters: the escape a NUL is stored as does not count."""
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "x" * 199 + "\x00"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "x" * 199 + "\\x00" == name_of(client, ckpt)
    assert client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "x" * 200 + "\x00"}).status_code == 422


def test_unstorable_characters_become_visible_text(client, ckpt):
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "a\x00b\nc\u202ed"})
    assert r.status_code == 200, r.text
    # NUL (PostgreSQL cannot store it) as the visible escape, a newline as a space; the bidi override
    # is kept as text (the UI shows it as an escape)
    assert r.json()["name"] == "a\\x00b c\u202ed" == name_of(client, ckpt)
    page = client.get(f"/checkpoints/{ckpt}").text
    assert "\u202e" not in page and "\\u202e" in page


def test_a_lone_surrogate_is_never_stored_raw(client, ckpt):
    r = client.patch(
        f"/api/v1/checkpoints/{ckpt}", content=b'{"name": "x\\ud800y"}', headers={"content-type": "application/json"}
    )
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert r.json()["name"] == "x\\ud800y"
    assert "\ud800" not in name_of(client, ckpt)


@pytest.mark.parametrize("headers", [{"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}])
def test_cross_origin_rename_is_refused(client, ckpt, headers):
    r = client.patch(f"/api/v1/checkpoints/{ckpt}", json={"name": "evil"}, headers=headers)
    assert r.status_code == 403 and r.json()["code"] == "cross_origin"
    assert name_of(client, ckpt) == "model.safetensors"


def test_rename_needs_the_token_when_one_is_set(tmp_path):
    path = f.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with make_client(tmp_path / "data", api_token=TOKEN) as c:
        cid = upload(c, path, headers=bearer).json()["id"]
        r = c.patch(f"/api/v1/checkpoints/{cid}", json={"name": "nope"})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        wrong = {"authorization": "Bearer wrong"}
        assert c.patch(f"/api/v1/checkpoints/{cid}", json={"name": "nope"}, headers=wrong).status_code == 401
        r = c.patch(f"/api/v1/checkpoints/{cid}", json={"name": "with token"}, headers=bearer)
        assert r.status_code == 200 and r.json()["name"] == "with token"
        # a browser's session (login form) works like the bearer token, from its own origin
        c.post("/login", data={"token": TOKEN, "next": "/", "csrf_token": csrf_token(c)}, follow_redirects=False)
        same = {"origin": "http://localhost"}
        assert c.patch(f"/api/v1/checkpoints/{cid}", json={"name": "by session"}, headers=same).status_code == 200
        evil = {"origin": "http://evil.example"}
        assert c.patch(f"/api/v1/checkpoints/{cid}", json={"name": "x"}, headers=evil).status_code == 403
        assert c.get(f"/api/v1/checkpoints/{cid}").json()["name"] == "by session"


# --- the upload's name field: the same rules ----------------------------------------------------


def test_upload_name_field_is_a_label(client, tmp_path):
    path = f.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with path.open("rb") as fh:
        r = client.post("/api/v1/checkpoints", files={"file": ("w.safetensors", fh)}, data={"name": " exp 7/ema "})
    assert r.status_code == 201 and r.json()["name"] == "exp 7/ema"
    with path.open("rb") as fh:
        r = client.post("/api/v1/checkpoints", files={"file": ("w.safetensors", fh)}, data={"name": "x" * 201})
    assert r.status_code == 422 and client.get("/api/v1/checkpoints").json()["total"] == 1


# --- the UI's rename form -------------------------------------------------------------------------


def test_ui_rename_form_needs_the_csrf_token(client, ckpt):
    token = csrf_token(client)
    r = client.post(f"/checkpoints/{ckpt}/rename", data={"name": "no token"}, follow_redirects=False)
    assert r.status_code == 403 and name_of(client, ckpt) == "model.safetensors"
    bad = {"name": "bad token", "csrf_token": "x" * 43}
    assert client.post(f"/checkpoints/{ckpt}/rename", data=bad, follow_redirects=False).status_code == 403
    r = client.post(
        f"/checkpoints/{ckpt}/rename", data={"name": "from the form", "csrf_token": token}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == f"/checkpoints/{ckpt}"
    assert name_of(client, ckpt) == "from the form"
    r = client.post(f"/checkpoints/{ckpt}/rename", data={"name": "  ", "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 422 and name_of(client, ckpt) == "from the form"
    r = client.post("/checkpoints/nope/rename", data={"name": "x", "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 404
