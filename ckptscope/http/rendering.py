"""What the HTTP layer needs of an HTML renderer. The web UI provides one (Jinja templates); the
app factory hands it over as ``app.state.html``, so this layer never imports the web package."""

from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response


class HtmlRenderer(Protocol):
    def page(self, request: Request, template: str, context: dict[str, Any], *, status: int = 200) -> Response:
        """A whole page."""
        ...

    def error(self, request: Request, status: int, title: str, detail: str) -> Response:
        """A readable error: a page, or the message fragment for an htmx request."""
        ...
