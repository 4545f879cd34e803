"""Jinja2 rendering with autoescape everywhere, and htmx block rendering.

A page is one template; an htmx request renders just one ``{% block %}`` of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

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


NUMBER_COLUMNS = ("mean", "std", "min", "max", "absmax")  # the tensor table's float statistics


def column_style(values: Iterable[float | int | None]) -> str:
    """How a whole table column shows its numbers, so that it never switches notation row to row:
    "sci" when any finite non-zero value has |x| < 1e-3 or |x| >= 1e5, else "fixed"."""
    for v in values:
        if v is not None and math.isfinite(v) and v != 0 and not 1e-3 <= abs(v) < 1e5:
            return "sci"
    return "fixed"


def column_styles(rows: Iterable[tuple[Any, Any]], keys: Iterable[str] = NUMBER_COLUMNS) -> dict[str, str]:
    """``column_style`` of each statistic over the (tensor, stats) rows of a table page."""
    stats = [s for _, s in rows if s is not None]
    return {k: column_style(getattr(s, k) for s in stats) for k in keys}


def colnum(value: float | int | None, style: str = "fixed") -> str:
    """4 significant digits in the column's notation: "fixed" (0.01234, 12.35, 12346) or "sci"
    (1.234e-05). Zero is "0" in both; None is "-"."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    if value == 0:
        return "0"
    if style == "sci":
        return f"{value:.3e}"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def fullnum(value: float | int | None) -> str:
    """Full precision (the shortest text that reads back as the same float), for titles and the
    detail panel; integers with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return repr(float(value))


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
env.filters.update(human_bytes=human_bytes, human_count=human_count, num=num, colnum=colnum, fullnum=fullnum)
env.globals.update(query=query, isfinite=math.isfinite, column_styles=column_styles)


def precompile() -> None:
    """Compile every template now, as the server starts (the checkpoint page alone takes ~0.1 s to
    compile), not in the first request that renders it."""
    for name in env.list_templates(extensions=["html"]):
        env.get_template(name)


precompile()


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    block: str | Sequence[str] | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """The whole page, or one block of it (several: one after the other, e.g. a fragment and the
    out-of-band swaps that come with it)."""
    tmpl = env.get_template(template)
    ctx = {"request": request, **context}
    if block is not None:
        blocks = [block] if isinstance(block, str) else list(block)
        html = "".join(part for name in blocks for part in tmpl.blocks[name](tmpl.new_context(ctx)))
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
