"""The OpenAPI document of the service: FastAPI's, finished here in one place.

FastAPI describes the routes and their models; this module adds what it cannot know:

- one error schema, ``Problem`` (RFC 9457 ``application/problem+json``, with ``code`` always), for
  every 4xx/5xx response of every operation, including FastAPI's own validation errors (422) and
  malformed bodies (400), exactly as ``ckptscope.http.problems`` writes them;
- the responses every route can give besides its own (the Host check, the bearer token, the body
  cap, the same-origin check, an unexpected error);
- the bearer security scheme (``CKPTSCOPE_API_TOKEN``), so Swagger UI's *Authorize* works;
- named operation ids (``listCheckpoints``, ``getTensor``), descriptions and examples of every
  parameter, and links from the operations that create a checkpoint to those that read it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ckptscope.http.auth import is_open
from ckptscope.http.guards import HOST_CHECK_EXEMPT
from ckptscope.http.problems import MAX_REPORTED_ERRORS

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
SECURITY_SCHEME = "bearerAuth"
UNSAFE_METHODS = frozenset({"post", "put", "patch", "delete"})
UPLOAD_OPERATIONS = frozenset({"uploadCheckpoint"})  # capped by CKPTSCOPE_MAX_UPLOAD_BYTES, not the body cap

# Route function name -> operation id. A route missing here gets its name in camelCase.
OPERATION_IDS = {
    "healthz": "getHealth",
    "readyz": "getReadiness",
    "metrics": "getMetrics",
    "upload_checkpoint": "uploadCheckpoint",
    "list_checkpoints": "listCheckpoints",
    "get_checkpoint": "getCheckpoint",
    "rename_checkpoint": "renameCheckpoint",
    "delete_checkpoint": "deleteCheckpoint",
    "get_tree": "getTree",
    "list_tensors": "listTensors",
    "get_preview": "getTensorPreview",
    "get_spectrum": "getTensorSpectrum",
    "get_tensor": "getTensor",
    "get_findings": "getFindings",
    "tensors_by_digest": "findTensorsByDigest",
    "modules_by_digest": "findModulesByDigest",
    "get_job": "getJob",
    "copy_modules": "copyModules",
    "check_rules": "checkCheckpoint",
    "freeze_plan": "planFreeze",
    "export_checkpoint": "exportCheckpoint",
    "download": "downloadCheckpoint",
    "diff": "diffCheckpoints",
}

EXAMPLE_ID = "4f0769a1753b49768ebba314955bc2d6"
EXAMPLE_DIGEST = "xxh3-128:9be9d5c4a1f0e2b3c4d5e6f708192a3b"

# Parameter name (lower case) -> (description, example). A route's own description wins.
PARAMETERS: dict[str, tuple[str, Any]] = {
    "checkpoint_id": ("a checkpoint's id, as the upload and the list give it", EXAMPLE_ID),
    "job_id": ("a stats job's id (a checkpoint's `job_id`)", "2b028dd3746541b3995d0fe081770859"),
    "name": (
        "tensor name as the tensor list gives it (percent-encode URL characters; `/` may stay)",
        "encoder.layers.0.weight",
    ),
    "digest": ("a content digest, 'xxh3-128:' and 32 lower-case hex digits", EXAMPLE_DIGEST),
    "root": (
        "key path of the tensor dict to use in a nested checkpoint (the checkpoint's `roots`); default: the weights",
        "state_dict",
    ),
    "filename": ("display name for a raw (non-multipart) body", "model.safetensors"),
    "path": ("dotted module path of the subtree to return ('' for the whole tree)", "encoder.layers"),
    "depth": ("levels of children to include; all when omitted", 2),
    "prefix": ("only names starting with this (a module path ends with '.')", "encoder."),
    "search": ("only names containing this (case-insensitive)", "weight"),
    "kind": ("only parameters, buffers or aliases (tied tensors)", "parameter"),
    "nonfinite": ("only tensors with NaN or Inf", False),
    "sort": ("the column to sort by", "std"),
    "desc": ("sort descending", True),
    "offset": ("rows to skip", 0),
    "limit": ("most rows to return", 100),
    "reduce": ("`mean`: block mean; `absmax`: the block's value of largest magnitude, with its sign", "mean"),
    "index": ("leading indices of a slice, comma-separated (a conv weight [out, in, kh, kw] -> w[0, 3])", "0,3"),
    "file": (
        "file name, for a sharded set (the checkpoint's `files`); the checkpoint's file when omitted",
        "model-00001-of-00002.safetensors",
    ),
    "a": ("id of the first checkpoint", EXAMPLE_ID),
    "b": ("id of the second checkpoint", "f8d72366903645bf9d98e6934f5cf072"),
    "a_root": ("root of the first checkpoint; default: its weights", "state_dict"),
    "b_root": ("root of the second checkpoint; default: its weights", "state_dict"),
    "idempotency-key": (
        "a key of the client's choosing: a retried upload with the same key answers with the checkpoint the "
        "first one created instead of making another",
        "upload-2026-12-01-model-a",
    ),
    "if-none-match": ("the ETag of a copy the client holds: 304 when it is still current", '"9be9d5c4a1f0e2b3"'),
}

# What each status means for every route (a route's own description comes first).
ERROR_DESCRIPTIONS = {
    400: "`bad_host`: the Host header is not one of CKPTSCOPE_ALLOWED_HOSTS",
    401: "`unauthorized`: CKPTSCOPE_API_TOKEN is set and the request has no valid `Authorization: Bearer` "
    "token (nor a browser session)",
    403: "`cross_origin`: a browser's state-changing request from another origin (Origin or Sec-Fetch-Site); "
    "`csrf`: a browser session's request without its anti-CSRF token",
    404: "`not_found`: unknown id or name; `unknown_root`: the checkpoint has no such root",
    413: "`body_too_large`: the body exceeds CKPTSCOPE_MAX_BODY_BYTES",
    422: "`validation`: a parameter or the body does not match this schema (`errors` says where); `invalid` "
    "and other codes: a well-formed request this data cannot satisfy (the detail says why)",
    500: "`internal`: an unexpected error; the server log has the details, under the response's X-Request-ID",
}
MALFORMED_BODY = "`bad_json`: the body is not valid JSON"
MALFORMED_UPLOAD = "`bad_multipart`: a malformed multipart body; `aborted`: the client left before the end"

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "An RFC 9457 problem document (`application/problem+json`): every error of the API. `code` is "
    "the machine-readable reason (also in `type`); some codes carry more members (`errors` for `validation` and "
    "`bad_json`, `report` for a refused copy, `pickle` for a refused pickle).",
    "required": ["type", "title", "status", "detail", "instance", "code"],
    "properties": {
        "type": {"type": "string", "description": "`/problems/<code>`", "examples": ["/problems/not_found"]},
        "title": {"type": "string", "description": "the HTTP status phrase", "examples": ["Not Found"]},
        "status": {"type": "integer", "minimum": 400, "maximum": 599, "description": "the HTTP status"},
        "detail": {"type": "string", "description": "what went wrong, in a sentence"},
        "instance": {"type": "string", "description": "the request's path", "examples": ["/api/v1/checkpoints/x"]},
        "code": {
            "type": "string",
            "pattern": "^[a-z][a-z0-9_]*$",
            "description": "machine-readable reason: not_found, unknown_root, validation, bad_json, invalid, "
            "unauthorized, bad_host, cross_origin, too_large, body_too_large, stats_pending, internal, a reader's "
            "reason (corrupt, unsafe_pickle, ...), ...",
            "examples": ["not_found"],
        },
        "errors": {
            "type": "array",
            "maxItems": MAX_REPORTED_ERRORS,
            "description": f"`validation` and `bad_json`: where the request fails (the first "
            f"{MAX_REPORTED_ERRORS}; `detail` counts the rest)",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        "description": "where: 'query'/'path'/'header'/'body' then the parameter or field path",
                        "examples": [["query", "limit"]],
                    },
                    "msg": {"type": "string", "examples": ["Input should be greater than or equal to 1"]},
                },
            },
        },
        "report": {"type": "object", "description": "a refused copy (`copy_mismatch`, `copy_empty`): its report"},
    },
    "additionalProperties": True,
    "examples": [
        {
            "type": "/problems/not_found",
            "title": "Not Found",
            "status": 404,
            "detail": "no checkpoint with id 'x'",
            "instance": "/api/v1/checkpoints/x",
            "code": "not_found",
        }
    ],
}

# Links from the operations that create a checkpoint to those that read it (Swagger shows them,
# stateful testers follow them).
CHECKPOINT_LINKS = ("getCheckpoint", "listTensors", "getTree", "getFindings", "renameCheckpoint")


def operation_id(route: APIRoute) -> str:
    """FastAPI's ``generate_unique_id_function``: a named, stable operation id."""
    return OPERATION_IDS.get(route.name) or re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), route.name)


def install(app: FastAPI) -> None:
    """Serve the finished document at /openapi.json (built once, on first use)."""

    fastapi_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(fastapi_document())  # FastAPI's, cached once finished
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """Add the error schema, the standard responses, security, parameter docs and links."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = copy.deepcopy(PROBLEM_SCHEMA)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "the server's CKPTSCOPE_API_TOKEN, as `Authorization: Bearer <token>`; needed only "
            "when the server sets one (then for everything but /healthz and /readyz)",
        }
    }
    document["security"] = [{SECURITY_SCHEME: []}]
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            _finish_operation(path, method, operation)
    return document


def _finish_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    if is_open(path):  # answered without the token
        operation["security"] = []
    for parameter in operation.get("parameters", []):
        description, example = PARAMETERS.get(parameter["name"].lower(), (None, None))
        if description and not parameter.get("description"):
            parameter["description"] = description
        if "example" not in parameter and "examples" not in parameter and example is not None:
            parameter["example"] = example
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for code, extra in _standard_errors(path, method, operation).items():
        response = responses.setdefault(str(code), {})
        own = response.get("description", "")
        if own and own != "Validation Error" and extra not in own:
            response["description"] = f"{own}; {extra}"
        else:
            response["description"] = extra
    for status, response in responses.items():
        if status == "default" or int(status) >= 400:
            response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}
        for media_type, media in response.get("content", {}).items():
            if not media.get("schema") and not media_type.endswith("json"):  # bytes (a PNG, a file)
                media["schema"] = {"type": "string", "format": "binary"}
    if operation.get("operationId") in ("uploadCheckpoint", "exportCheckpoint"):
        created = responses.get("201")
        if created is not None:
            created["links"] = {
                target: {
                    "operationId": target,
                    "parameters": {"checkpoint_id": "$response.body#/id"},
                    "description": f"{target} of the new checkpoint",
                }
                for target in CHECKPOINT_LINKS
            } | {
                "getJob": {
                    "operationId": "getJob",
                    "parameters": {"job_id": "$response.body#/job_id"},
                    "description": "its stats job",
                }
            }


def _standard_errors(path: str, method: str, operation: dict[str, Any]) -> dict[int, str]:
    """The error statuses an operation can answer with, beyond its route's own."""
    has_parameters = bool(operation.get("parameters"))
    body = operation.get("requestBody")
    json_body = body is not None and "application/json" in body.get("content", {})
    upload = operation.get("operationId") in UPLOAD_OPERATIONS
    found: dict[int, str] = {}
    bad_request = [] if path in HOST_CHECK_EXEMPT else [ERROR_DESCRIPTIONS[400]]
    if json_body:
        bad_request.append(MALFORMED_BODY)
    if upload:
        bad_request.append(MALFORMED_UPLOAD)
    if bad_request:
        found[400] = "; ".join(bad_request)
    if not is_open(path):
        found[401] = ERROR_DESCRIPTIONS[401]
    if method in UNSAFE_METHODS:
        found[403] = ERROR_DESCRIPTIONS[403]
    if "{checkpoint_id}" in path or "{job_id}" in path:
        found[404] = ERROR_DESCRIPTIONS[404]
    if body is not None and not upload:
        found[413] = ERROR_DESCRIPTIONS[413]
    if has_parameters or body is not None:
        found[422] = ERROR_DESCRIPTIONS[422]
    found[500] = ERROR_DESCRIPTIONS[500]
    return found
