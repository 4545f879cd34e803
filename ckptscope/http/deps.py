"""Typed FastAPI dependencies shared by the API and the web UI."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from ckptscope.core import Core

from .rendering import HtmlRenderer

# Bounds of integer query parameters: beyond them a value is a 422, never a database overflow.
MAX_OFFSET = 1_000_000_000  # rows; far beyond any checkpoint's tensor count, far below 2**63
MAX_PAGE = 10_000_000  # pages of the UI's tensor table (50 rows each)
MAX_DEPTH = 10_000  # levels of a module tree


def get_core(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


def get_html(request: Request) -> HtmlRenderer:
    html: HtmlRenderer = request.app.state.html
    return html


CoreDep = Annotated[Core, Depends(get_core)]
HtmlDep = Annotated[HtmlRenderer, Depends(get_html)]
RootQuery = Annotated[
    str | None, Query(description="key path of the tensor dict to use in a nested checkpoint; default: the weights")
]
