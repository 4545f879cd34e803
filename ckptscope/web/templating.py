"""Jinja2 rendering with autoescape everywhere, and htmx block rendering.

A page is one template; an htmx request renders just one ``{% block %}`` of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from ckptscope.stats import HIST_BINS
from ckptscope.text import reveal
from ckptscope.units import human_bytes, human_count

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"


def num(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.5g}"
    return f"{value:.4e}"


def histogram_bars(hist: list[int], width: int = 640, height: int = 160) -> list[dict[str, float]]:
    """SVG bar geometry for a histogram (linear heights, at least 1px for non-empty bins)."""
    top = max(hist) if hist else 0
    bar = width / HIST_BINS
    bars = []
    for i, count in enumerate(hist):
        h = 0.0 if top == 0 or count == 0 else max(1.0, height * count / top)
        bars.append(
            {
                "x": round(i * bar, 2),
                "y": round(height - h, 2),
                "w": round(bar * 0.85, 2),
                "h": round(h, 2),
                "count": count,
            }
        )
    return bars


def reveal_controls(value: Any) -> Any:
    """Show invisible and bidirectional control characters (e.g. U+202E, which reverses the text
    after it, or zero-width spaces) as visible escapes, so attacker-chosen names cannot disguise
    themselves. Template-made markup passes untouched."""
    if not isinstance(value, str) or isinstance(value, Markup):
        return value
    return reveal(value, keep="\n\t")


def query(base: dict[str, Any], **changes: Any) -> str:
    merged = {**base, **changes}
    return urlencode({k: "true" if v is True else v for k, v in merged.items() if v not in (None, "", False)})


env = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=reveal_controls,
)
env.filters.update(human_bytes=human_bytes, human_count=human_count, num=num)
env.globals.update(histogram_bars=histogram_bars, query=query, isfinite=math.isfinite)


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    block: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    tmpl = env.get_template(template)
    ctx = {"request": request, **context}
    if block is not None:
        html = "".join(tmpl.blocks[block](tmpl.new_context(ctx)))
    else:
        html = tmpl.render(ctx)
    response = HTMLResponse(html, status_code=status, headers=headers)
    response.headers["Vary"] = "HX-Request, HX-Target"
    return response


class JinjaRenderer:
    """The HTML renderer the HTTP layer uses for login pages and errors (``HtmlRenderer``)."""

    def page(self, request: Request, template: str, context: dict[str, Any], *, status: int = 200) -> HTMLResponse:
        return render(request, template, context, status=status)

    def error(self, request: Request, status: int, title: str, detail: str) -> HTMLResponse:
        block = "message" if is_htmx(request) else None
        return render(request, "error.html", {"status": status, "title": title, "detail": detail}, block, status)


RENDERER = JinjaRenderer()
