"""HTTP validators for content-addressed JSON (RFC 9110 section 8.8 and 13, RFC 9111 section 5.2).

A checkpoint's tree, tensor pages and tensors are functions of its content (the sha256 that keys
it), the request's query parameters, the settings that shape the answer (the findings thresholds)
and the response's schema. Once the stats of that content are finished nothing else changes them,
so their entity tag is *derived* from those inputs, never by hashing a body after building it: a
matching ``If-None-Match`` is answered ``304 Not Modified`` after one catalogue lookup, before the
page is read or serialized. While the stats are pending or running the JSON changes as they come
in: such responses carry no validator and ``Cache-Control: no-cache``.

``public`` lets shared caches keep the answer; with ``CKPTSCOPE_API_TOKEN`` set, responses to
authenticated requests are ``private`` instead, so a shared cache never hands them to a client
without the token (RFC 9111 section 3.5: ``public`` would allow it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from ckptscope import __version__
from ckptscope.store.catalogue import Content, StatsState

ONE_YEAR = 31_536_000
IMMUTABLE_PUBLIC = f"public, max-age={ONE_YEAR}, immutable"
IMMUTABLE_PRIVATE = f"private, max-age={ONE_YEAR}, immutable"
REVALIDATE = "no-cache"

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text (RFC 9110 8.8.3)
_ENTITY_TAG = re.compile(r'(W/)?("[\x21\x23-\x7e\x80-\xff]*")')


def entity_tag(*parts: Any) -> str:
    """A strong entity tag from the inputs that determine a representation (JSON-able values)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def parse_if_none_match(value: str) -> list[str] | None:
    """The opaque tags of an ``If-None-Match`` list (weak ones without their ``W/``), ``["*"]`` for
    ``*``; None when the field is malformed or empty (then it is ignored, as RFC 9110 lets a
    recipient do with a field it cannot parse)."""
    value = value.strip(" \t")
    if value == "*":
        return ["*"]
    tags: list[str] = []
    position = 0
    while True:
        while position < len(value) and value[position] in " \t,":  # OWS and empty list elements
            position += 1
        if position == len(value):
            return tags or None
        found = _ENTITY_TAG.match(value, position)
        if found is None:
            return None
        tags.append(found.group(2))
        position = found.end()
        while position < len(value) and value[position] in " \t":
            position += 1
        if position < len(value) and value[position] != ",":
            return None


def none_match(header: str | None, etag: str | None, exists: Callable[[], object] | None = None) -> bool:
    """Whether an ``If-None-Match`` condition is *false* for a representation with ``etag`` (so a GET
    is answered 304): one of its tags equals ``etag`` under the weak comparison, or it is ``*`` (any
    current representation: ``exists()`` is called first, to raise when there is none)."""
    if not header:
        return False
    tags = parse_if_none_match(header)
    if tags is None:
        return False
    if tags == ["*"]:
        if exists is not None:
            exists()
        return True
    if etag is None:
        return False
    opaque = etag.removeprefix("W/")
    return opaque in tags


@cache
def schema_version(model: type[BaseModel]) -> str:
    """The version of a response's JSON: the ckptscope release and a digest of the response model's
    JSON schema, so that a change of either changes every entity tag derived from it."""
    schema = json.dumps(model.model_json_schema(), sort_keys=True)
    return f"{__version__}+{hashlib.sha256(schema.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class Validators:
    """What a response of content-addressed JSON says about caching: its entity tag (None while the
    stats are not finished) and its ``Cache-Control``."""

    etag: str | None
    cache_control: str

    def headers(self) -> dict[str, str]:
        found = {"Cache-Control": self.cache_control}
        if self.etag is not None:
            found["ETag"] = self.etag
        return found

    def apply(self, response: Response) -> Response:
        for key, value in self.headers().items():
            response.headers[key] = value
        return response

    def not_modified(self, request: Request, exists: Callable[[], object] | None = None) -> Response | None:
        """A ``304 Not Modified`` (with the headers a 200 would carry) when the request's
        ``If-None-Match`` fails for this representation; None when the full response is due."""
        if request.method not in ("GET", "HEAD"):
            return None
        if none_match(request.headers.get("if-none-match"), self.etag, exists):
            return Response(status_code=304, headers=self.headers())
        return None


def content_validators(
    request: Request, content: Content, model: type[BaseModel], /, *, immutable: bool = True, **params: Any
) -> Validators:
    """The validators of a response ``model`` about ``content`` for these (validated, normalized)
    query parameters: once the content's stats are done, an entity tag derived from them and an
    immutable ``Cache-Control`` (``no-cache``, revalidate every time, when not ``immutable``: the
    response also shows catalogue rows that may change, which ``params`` must then hold); before,
    ``no-cache`` and no tag."""
    if content.stats_state != StatsState.DONE:
        return Validators(None, REVALIDATE)
    etag = entity_tag(content.key, model.__name__, schema_version(model), params)
    if not immutable:
        return Validators(etag, REVALIDATE)
    shared = not request.app.state.core.settings.api_token
    return Validators(etag, IMMUTABLE_PUBLIC if shared else IMMUTABLE_PRIVATE)
