"""The FastAPI application: API, web UI, static assets, security headers."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from app import __version__, problems
from app.api.routes import ops_router
from app.api.routes import router as api_router
from app.api.schemas import Health
from app.config import Settings, get_settings
from app.services.core import Core
from app.web.routes import router as web_router

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

log = logging.getLogger("ckptscope")


def check_environment() -> None:
    """Refuse to run where torch could be told to unpickle arbitrary code."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise RuntimeError(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: it makes torch.load run pickled code. "
            "ckptscope refuses to start with it; unset it."
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    check_environment()
    settings = settings or get_settings()
    core = Core(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        core.start()
        log.info(
            "ckptscope %s: data in %s, catalogue %s",
            __version__,
            settings.data_dir,
            settings.resolved_database_url.split("@")[-1],
        )
        try:
            yield
        finally:
            core.close()

    app = FastAPI(
        title="ckptscope",
        version=__version__,
        description="Inspect model checkpoints: module tree, per-tensor statistics.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.core = core
    problems.install(app)
    app.include_router(api_router)
    app.include_router(ops_router)
    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    return app
