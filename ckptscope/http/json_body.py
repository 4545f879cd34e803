"""JSON bodies on routes that also take uploads (and so are outside the request body cap): read
with a cap of their own and validated by a pydantic model, failing as every other route fails
(400 ``bad_json`` for a body that is not JSON, 422 ``validation`` for one that does not fit)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from .problems import Refused

M = TypeVar("M", bound=BaseModel)


def is_json_request(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_model(request: Request, model: type[M], limit: int) -> M:
    """The body parsed as ``model``; at most ``limit`` bytes are read (CKPTSCOPE_MAX_BODY_BYTES)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, "body_too_large", f"the request body exceeds {limit} bytes (CKPTSCOPE_MAX_BODY_BYTES)")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        error = {"type": "json_invalid", "loc": ("body", 0), "msg": f"JSON decode error: {exc}"[:200], "input": {}}
        raise RequestValidationError([error]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None
