"""Pages and the package use only self-hosted assets."""

from __future__ import annotations

from tests.helpers import ROOT


def test_no_cdn_anywhere():
    paths = [
        *ROOT.glob("ckptscope/web/templates/*.html"),
        *ROOT.glob("ckptscope/web/static/*.js"),
        *ROOT.glob("ckptscope/**/*.py"),
    ]
    assert paths, f"no sources found under {ROOT}"
    for path in paths:
        text = path.read_text()
        for host in ("cdn.", "jsdelivr", "unpkg", "cdnjs"):
            assert host not in text, f"{path} mentions {host}"
