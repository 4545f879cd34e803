"""Hostile text in names and metadata, and safetensors headers at the edges of the format.

Every case ends in a clear 4xx (nothing stored, nothing left behind) or a 201 whose every view
answers 2xx: the REST detail, tensors, one tensor, tree, the HTML page and its tree fragment, and
the CLI (text and --json, exit 0), which never prints a raw control character.

- lone UTF-16 surrogates: refused in tensor names (422 ``bad_name``, as NUL), escaped as the text
  ``\\ud800`` in metadata keys and values;
- terminal escape sequences, C0/C1 controls and bidi overrides: accepted, shown escaped;
- safetensors without tensors (``{}``, only ``__metadata__``): accepted;
- ``__metadata__`` that the safetensors library refuses (``[]``, ``0``, ``""``, ``false``,
  non-string values): refused with 422, exactly where ``safetensors.safe_open`` refuses.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from safetensors import safe_open

from ckptscope.errors import Invalid
from ckptscope.formats import Checkpoint, RootInfo, StorageRef, TensorInfo
from ckptscope.text import make_storable, reveal, storable_text
from tests import factories as f
from tests.helpers import assert_one_line_refusal, upload, wait_stats

CONTROL = [
    "\x1b]0;owned title\x07",  # OSC 0: sets the terminal's title
    "\x1b[2J\x1b[H",  # clears the screen
    "\x1b]52;c;ZWNobyBvd25lZA==\x07",  # OSC 52: writes the clipboard
    "\x9b31m",  # C1 CSI
    "back\x08\x08space\r",
    "\u202eexe.txt",  # right-to-left override
    "zero\u200bwidth",
]
RAW = ("\x1b", "\x07", "\x9b", "\x08", "\r", "\u202e", "\u200b")  # must never reach a terminal


def _st_raw(header: str, data: bytes = b"") -> bytes:
    """A safetensors file from header text: JSON escapes such as ``\\ud800`` stay as written."""
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32 = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


def _leftovers(data_dir: Path) -> tuple[list[Path], list[Path]]:
    blobs = [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]
    return blobs, list((data_dir / "tmp").iterdir())


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400", "PYTHONIOENCODING": "utf-8"}  # wide: rich cuts no cell
    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",  # the assertion below, not the decoder, judges the bytes
        timeout=timeout,
        env=env,
    )


def _assert_inert(out: subprocess.CompletedProcess[str]) -> None:
    for ch in RAW:
        assert ch not in out.stdout and ch not in out.stderr, f"raw {ch!r} printed"
    assert not any("\udc80" <= ch <= "\udcff" for ch in out.stdout + out.stderr), "not UTF-8 output"


def _refused(out: subprocess.CompletedProcess[str], *fragments: str, status: int = 3) -> None:
    assert_one_line_refusal(out, *fragments, status=status)
    _assert_inert(out)


def _every_view(client, checkpoint_id: str) -> dict:
    """Every read of an accepted checkpoint answers 2xx; returns the JSON detail."""
    body = wait_stats(client, checkpoint_id)
    assert body["stats_state"] == "done", body
    base = f"/api/v1/checkpoints/{checkpoint_id}"
    page = client.get(f"{base}/tensors", params={"limit": 5000})
    assert page.status_code == 200, page.text
    for t in page.json()["tensors"][:3]:
        one = client.get(f"{base}/tensors/{quote(t['name'], safe='')}")
        assert one.status_code == 200 and one.json()["name"] == t["name"], one.text
        html = client.get(f"/checkpoints/{checkpoint_id}", params={"tensor": t["name"]})
        assert html.status_code == 200 and "\x1b" not in html.text
    assert client.get(f"{base}/tree").status_code == 200
    html = client.get(f"/checkpoints/{checkpoint_id}")
    assert html.status_code == 200 and "\x1b" not in html.text and "\u202e" not in html.text
    assert client.get(f"/checkpoints/{checkpoint_id}/tree", params={"path": ""}).status_code == 200
    assert client.get("/api/v1/checkpoints").status_code == 200
    assert client.get("/").status_code == 200
    return body


# --- lone surrogates ----------------------------------------------------------------------------


def _surrogate_name_files(tmp_path: Path) -> list[Path]:
    st = tmp_path / "surrogate-name.safetensors"  # no producer writes one: hand-built JSON escape
    second = F32.replace("[0, 4]", "[4, 8]")
    st.write_bytes(_st_raw('{"ok": ' + F32 + ', "a\\ud800b": ' + second + "}", bytes(8)))
    # torch.save pickles names as BINUNICODE with surrogatepass, so it does write them
    zipped = f.save_torch({"ok": torch.ones(1), "w\ud800": torch.ones(2)}, tmp_path / "surrogate-name.pt")
    legacy = f.save_torch({"enc.w\udfff": torch.ones(2)}, tmp_path / "surrogate-name-legacy.pt", legacy=True)
    nested = f.save_torch({"state_dict": {"x\udc80": torch.ones(1)}, "epoch": 1}, tmp_path / "surrogate-root.ckpt")
    return [st, zipped, legacy, nested]


def test_lone_surrogates_in_tensor_names_are_refused_everywhere(client, data_dir, tmp_path):
    for path in _surrogate_name_files(tmp_path):
        r = upload(client, path)
        assert r.status_code == 422, (path.name, r.status_code, r.text)
        problem = r.json()
        assert problem["code"] == "bad_name" and "surrogate" in problem["detail"], problem
        assert r.headers["content-type"] == "application/problem+json"
        assert _leftovers(data_dir) == ([], []), path.name
        assert client.get("/api/v1/checkpoints").json()["total"] == 0
        _refused(_cli("inspect", str(path)), str(path), "lone UTF-16 surrogate")
        _refused(_cli("inspect", str(path), "--json"), "lone UTF-16 surrogate")


def test_nul_in_a_name_is_refused_by_the_cli_too(tmp_path):
    path = f.save_safetensors({"a\x00b": torch.ones(1)}, tmp_path / "nul.safetensors")
    _refused(_cli("inspect", str(path), "--no-stats"), "NUL character")


def test_lone_surrogates_in_metadata_are_escaped_and_every_view_works(client, tmp_path):
    st = tmp_path / "surrogate-meta.safetensors"
    st.write_bytes(_st_raw('{"__metadata__": {"k": "v\\ud800", "\\udfff": "x\\u0000y"}, "a": ' + F32 + "}", bytes(4)))
    pt = f.save_torch({"w": torch.ones(2), "note": "x\ud800y", "hp": {"\udc80k": ["\udbff"]}}, tmp_path / "m.pt")
    for path, want in [
        (st, {"__metadata__.k": "v\\ud800", "__metadata__.\\udfff": "x\\x00y"}),
        (pt, {"note": "x\\ud800y", "hp.\\udc80k": ["\\udbff"]}),
    ]:
        r = upload(client, path)
        assert r.status_code == 201, r.text
        body = _every_view(client, r.json()["id"])
        for key, value in want.items():
            assert body["metadata"][key] == value, body["metadata"]
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # no lone surrogate left: encodable
        out = _cli("inspect", str(path))
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert "\\ud800" in out.stdout
        _assert_inert(out)
        out = _cli("inspect", str(path), "--json", "--no-stats")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        for key, value in want.items():
            assert data["metadata"][key] == value


def test_make_storable_refuses_storage_keys_and_escapes_warnings():
    def listing(name: str, key: str) -> Checkpoint:
        ref = StorageRef("/x", 0, 4, key)
        tensor = TensorInfo(name, "float32", (1,), (1,), 0, ref)
        return Checkpoint("torch-legacy", [tensor], [RootInfo("", 1)], warnings=["skipped \ud800 \x00"])

    ok = listing("w", "0")
    make_storable(ok)
    assert ok.warnings == ["skipped \\ud800 \\x00"]
    for name, key in [("w", "k\ud800"), ("w", "k\x00"), ("w\udfff", "0")]:
        with pytest.raises(Invalid) as exc:
            make_storable(listing(name, key))
        assert exc.value.code == "bad_name" and exc.value.status == 422
        assert str(exc.value).isascii()
    assert storable_text({"a\x00": ("\ud800", 1, None)}) == {"a\\x00": ["\\ud800", 1, None]}


def test_reveal_leaves_no_control_character():
    for text in [*CONTROL, "\ud800", "line\nbreak\ttab", "\u2028", "\x7f", "\U000e0041"]:
        shown = reveal(text)
        assert shown.isprintable() and not any(ch in shown for ch in RAW), shown
    assert reveal("\x1b]0;t\x07") == "\\x1b]0;t\\x07"
    assert reveal("\u202eabc") == "\\u202eabc"
    assert reveal("\U000e0041") == "\\U000e0041"
    assert reveal("plain ünïcödé 名前.weight") == "plain ünïcödé 名前.weight"


# --- control and escape sequences --------------------------------------------------------------


def _control_files(tmp_path: Path) -> list[Path]:
    tensors = {f"enc.{name}.weight": torch.full((2,), float(i)) for i, name in enumerate(CONTROL)}
    meta = {name: name for name in CONTROL}
    st = f.save_safetensors(tensors, tmp_path / "control.safetensors", metadata=meta)
    pt = f.save_torch({"state_dict": tensors, "note": CONTROL[0], CONTROL[2]: CONTROL[1]}, tmp_path / "control.ckpt")
    legacy = f.save_torch(tensors, tmp_path / "control-legacy.pt", legacy=True)
    return [st, pt, legacy]


def test_control_sequences_are_accepted_and_never_printed_raw(client, tmp_path):
    for path in _control_files(tmp_path):
        r = upload(client, path)
        assert r.status_code == 201, r.text
        body = _every_view(client, r.json()["id"])
        names = {t["name"] for t in client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()["tensors"]}
        assert f"enc.{CONTROL[0]}.weight" in names  # JSON carries them verbatim
        out = _cli("inspect", str(path))  # the tree, the table with stats, the metadata
        assert out.returncode == 0 and out.stderr == "", out.stderr
        _assert_inert(out)
        assert "\\x1b]0;owned title\\x07" in out.stdout and "\\u202eexe" in out.stdout, out.stdout
        out = _cli("inspect", str(path), "--json", "--no-stats")
        assert out.returncode == 0 and out.stdout.isascii()  # JSON's own escapes
        assert any(CONTROL[0] in t["name"] for t in json.loads(out.stdout)["tensors"])


def test_copy_diff_freeze_export_reports_are_escaped(tmp_path):
    a = f.save_safetensors(
        {f"enc.{n}.weight": torch.ones(2) for n in CONTROL} | {"head.w": torch.ones(3)}, tmp_path / "a.safetensors"
    )
    b = f.save_safetensors(
        {f"enc.{n}.weight": torch.zeros(2) for n in CONTROL[:3]} | {"other\x1b[5m": torch.ones(1)},
        tmp_path / "b.safetensors",
    )
    outputs = [
        _cli("diff", str(a), str(b)),
        _cli("copy", str(a), str(b), "--map", "enc=enc", "--dry-run", "--no-strict"),
        _cli("copy", str(a), str(b), "--map", "enc=enc", "-o", str(tmp_path / "c.safetensors")),
        _cli("freeze", str(a), "--freeze", f"enc.{CONTROL[0]}", "--freeze", "nope\x1b[2J"),
        _cli("freeze", str(a), "--freeze", f"enc.{CONTROL[1]}", "--snippet"),
        _cli("export", str(a), "--include", "enc", "-o", str(tmp_path / "e\x1b[1m.safetensors")),
    ]
    for out in outputs:
        _assert_inert(out)
    diff, dry, strict, freeze, snippet, export = outputs
    assert diff.returncode == 1 and "\\x1b]0;owned title\\x07" in diff.stdout and "other\\x1b[5m" in diff.stdout
    assert dry.returncode == 0 and "unexpected: " in dry.stdout and "\\u202eexe" in dry.stdout
    assert strict.returncode == 1 and "strict copy refused" in strict.stderr
    assert freeze.returncode == 0 and "matches no tensor" in freeze.stderr and "\\x1b[2J" in freeze.stderr
    assert snippet.returncode == 0 and "requires_grad_(False)" in snippet.stdout
    assert export.returncode == 0 and "e\\x1b[1m.safetensors" in export.stdout
    with safe_open(tmp_path / "e\x1b[1m.safetensors", "pt") as fh:
        assert len(list(fh.keys())) == len(CONTROL)


def test_error_lines_are_escaped(tmp_path):
    junk = tmp_path / "junk\x1b]0;t\x07.pt"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    _refused(_cli("inspect", str(junk)), "unrecognised file", "junk\\x1b]0;t\\x07.pt")
    _refused(_cli("inspect", str(tmp_path / "missing\u202e.pt")), "No such file", "missing\\u202e.pt")
    # a pickle naming a global with an escape sequence in it: the refusal names it, escaped
    evil = tmp_path / "global.pkl"
    evil.write_bytes(b"\x80\x02c\x1b]0;x\x07os\nsystem\n)R.")
    _refused(_cli("inspect", str(evil)))
    good = f.save_safetensors({"a": torch.ones(1)}, tmp_path / "g.safetensors")
    _refused(_cli("inspect", str(good), "--root", "\x1b[2J"), "no root", status=2)  # a usage error


# --- safetensors headers at the edges ----------------------------------------------------------


def _empty_files(tmp_path: Path) -> list[Path]:
    from safetensors.torch import save_file

    save_file({}, tmp_path / "empty.safetensors")  # the real producer writes "{}" (padded)
    save_file({}, tmp_path / "only-meta.safetensors", metadata={"format": "pt", "note\x1b[2J": "x"})
    (tmp_path / "bare.safetensors").write_bytes(_st_raw("{}"))
    (tmp_path / "null-meta.safetensors").write_bytes(_st_raw('{"__metadata__": null}'))
    return [tmp_path / f"{n}.safetensors" for n in ("empty", "only-meta", "bare", "null-meta")]


def test_safetensors_without_tensors_is_accepted_and_every_view_works(client, tmp_path):
    ids = {}
    for path in _empty_files(tmp_path):
        with safe_open(path, "pt") as fh:  # the library opens them too
            assert list(fh.keys()) == []
        r = upload(client, path)
        assert r.status_code == 201, (path.name, r.text)
        assert r.json()["tensor_count"] == 0 and r.json()["total_bytes"] == 0
        ids[path.name] = r.json()["id"]
        body = _every_view(client, r.json()["id"])
        page = client.get(f"/api/v1/checkpoints/{body['id']}/tensors").json()
        assert page["total"] == 0 and page["tensors"] == []
        tree = client.get(f"/api/v1/checkpoints/{body['id']}/tree").json()["tree"]
        assert tree["tensor_count"] == 0 and tree.get("children", []) == []
        out = _cli("inspect", str(path), "--json")  # with stats: nothing to compute
        assert out.returncode == 0 and json.loads(out.stdout)["tensor_count"] == 0, out.stderr
        if path.name in ("empty.safetensors", "only-meta.safetensors"):  # the producer's files: every command
            for args in (
                ["inspect", str(path)],
                ["freeze", str(path), "--freeze", "x"],
                ["diff", str(path), str(path)],
            ):
                out = _cli(*args)
                assert out.returncode == 0, out.stderr
                _assert_inert(out)
    meta = client.get(f"/api/v1/checkpoints/{ids['only-meta.safetensors']}").json()["metadata"]
    assert meta == {"__metadata__.format": "pt", "__metadata__.note\x1b[2J": "x"}, meta


BAD_METADATA = ["[]", "0", '""', "false", "true", '"x"', "1.5", '{"a": 1}', '{"a": null}', '{"a": ["b"]}', '{"a": {}}']


@pytest.mark.parametrize("meta", BAD_METADATA)
def test_metadata_the_library_refuses_is_refused(client, data_dir, tmp_path, meta):
    for header, data in [
        ('{"__metadata__": ' + meta + ', "t": ' + F32 + "}", bytes(4)),
        ('{"__metadata__": ' + meta + "}", b""),
    ]:
        path = tmp_path / "bad-meta.safetensors"
        path.write_bytes(_st_raw(header, data))
        with pytest.raises(Exception, match="expected a"):  # the reference: safetensors refuses it
            safe_open(path, "pt")
        r = upload(client, path)
        assert r.status_code == 422, (header, r.text)
        problem = r.json()
        assert problem["code"] == "corrupt_safetensors" and "__metadata__" in problem["detail"], problem
        assert _leftovers(data_dir) == ([], []) and client.get("/api/v1/checkpoints").json()["total"] == 0
        _refused(_cli("inspect", str(path), "--no-stats"), "__metadata__")


@pytest.mark.parametrize("meta", ["null", "{}", '{"a": "b", "": ""}'])
def test_metadata_the_library_accepts_is_accepted(client, tmp_path, meta):
    path = tmp_path / "meta.safetensors"
    path.write_bytes(_st_raw('{"__metadata__": ' + meta + ', "t": ' + F32 + "}", bytes(4)))
    with safe_open(path, "pt") as fh:
        expected = fh.metadata() or {}
    r = upload(client, path)
    assert r.status_code == 201, r.text
    body = _every_view(client, r.json()["id"])
    assert body["metadata"] == {f"__metadata__.{k}": v for k, v in expected.items()}
