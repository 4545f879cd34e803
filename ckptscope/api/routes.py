"""``/api/v1``: thin JSON routes over the services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ckptscope.core import Core
from ckptscope.formats.model import module_types_under
from ckptscope.http import caching
from ckptscope.http.deps import MAX_DEPTH, MAX_OFFSET, CoreDep, RootQuery
from ckptscope.http.idempotency import IdempotencyKeyHeader
from ckptscope.http.json_body import is_json_request, read_model
from ckptscope.http.problems import problem
from ckptscope.http.uploads import receive_uploads
from ckptscope.insights.identity import DIGEST_PATTERN
from ckptscope.services import catalogue_ops as ops
from ckptscope.services import check as check_svc
from ckptscope.services import checkpoints as svc
from ckptscope.services import idempotency as idempotency_svc
from ckptscope.services import identity as identity_svc
from ckptscope.services import insights as insights_svc
from ckptscope.services import references
from ckptscope.services.inspect import parameter_of, tensor_record
from ckptscope.store.catalogue import Checkpoint, Content, Job, JobState, StatsState

from . import schemas, tensor_rows

router = APIRouter(prefix="/api/v1", tags=["checkpoints"])

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
ERRORS: dict[int | str, dict[str, Any]] = {404: {**PROBLEM, "description": "unknown id or name"}}


def checkpoints_out(core: Core, pairs: list[tuple[Checkpoint, Content]]) -> list[dict[str, Any]]:
    """Checkpoints as the API shows them; the newest stats job of every one in a single query."""
    jobs = core.queries.jobs_for([content.key for _, content in pairs])
    return [
        {
            "id": row.id,
            "name": row.name,
            "sha256": content.key,
            "format": content.format,
            "tensor_count": content.tensor_count,
            "total_bytes": content.total_bytes,
            "size_bytes": row.size_bytes,
            "created_at": row.created_at,
            "origin": row.origin,
            "stats_state": content.stats_state,
            "job_id": jobs.get(content.key),
            "source": references.source_of(row),
        }
        for row, content in pairs
    ]


def checkpoint_out(core: Core, row: Checkpoint, content: Content) -> dict[str, Any]:
    return checkpoints_out(core, [(row, content)])[0]


def checkpoint_location(checkpoint_id: str) -> dict[str, str]:
    """The ``Location`` header of a response that made (or names) a checkpoint."""
    return {"Location": f"{router.prefix}/checkpoints/{checkpoint_id}"}


MAX_CHECKPOINT_PAGE = 1000  # checkpoints one list request may ask for


def job_out(job: Job) -> dict[str, Any]:
    progress = 1.0 if job.state == JobState.DONE else (job.done / job.total if job.total else 0.0)
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "done": job.done,
        "total": job.total,
        "progress": round(progress, 4),
        "error": job.error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


@router.post(
    "/checkpoints",
    status_code=201,
    response_model=schemas.CheckpointOut,
    responses={
        200: {
            "model": schemas.CheckpointOut,
            "description": "a retry (same Idempotency-Key, files and name): the checkpoint the first request made",
        },
        201: {
            "description": "registered; `Location` names the new checkpoint",
            "headers": {"Location": {"description": "/api/v1/checkpoints/{id}", "schema": {"type": "string"}}},
        },
        403: {**PROBLEM, "description": "a source outside CKPTSCOPE_SOURCE_ROOTS / _BUCKETS, or refused by its store"},
        404: {**PROBLEM, "description": "the source does not exist"},
        409: {**PROBLEM, "description": "the source changed while it was listed"},
        413: {**PROBLEM, "description": "upload larger than CKPTSCOPE_MAX_UPLOAD_BYTES"},
        422: {**PROBLEM, "description": "not a readable checkpoint (the detail says why)"},
        502: {**PROBLEM, "description": "the source's store did not answer"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "minItems": 1,
                                "description": "the checkpoint's file; for a sharded set its index and shards",
                            },
                            "name": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 200,
                                "pattern": schemas.LABEL_PATTERN,
                                "description": "a label for the checkpoint (default: the file name)",
                            },
                        },
                        "required": ["file"],
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": schemas.ReferenceIn.model_json_schema()},
            },
            "required": True,
        }
    },
)
async def upload_checkpoint(
    request: Request,
    response: Response,
    core: CoreDep,
    filename: Annotated[str | None, Query(description="display name for a raw (non-multipart) body")] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> dict[str, Any]:
    """Upload a checkpoint: multipart field `file` (repeat it for a sharded set with its index) or
    the raw file as the body with `?filename=`; or register one where it lives without copying it:
    a JSON body `{"source": "s3://bucket/key"}` or `{"source": "file:///path"}` (only headers are
    read to list it). Stats are computed in the background. `201` with `Location`; with an
    `Idempotency-Key`, a retry of the same upload answers `200` with the checkpoint the first
    request made."""
    if is_json_request(request):  # by reference: {"source": "s3://..."} or {"source": "file:///..."}
        wanted = await read_model(request, schemas.ReferenceIn, core.settings.max_body_bytes)
        if idempotency_key is None:
            made = await run_in_threadpool(references.register_reference, core, wanted.source, wanted.name)
        else:
            made, replayed = await run_in_threadpool(
                idempotency_svc.register_once, core, wanted.source, idempotency_key, wanted.name
            )
    else:
        uploads, fields = await receive_uploads(core, request, filename)
        name = fields.get("name") or None
        if idempotency_key is None:
            made = await run_in_threadpool(svc.ingest, core, uploads, name=name)  # parses in a sandbox
        else:
            made, replayed = await run_in_threadpool(idempotency_svc.ingest_once, core, uploads, idempotency_key, name)
    if idempotency_key is not None and replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    row, content = svc.get_checkpoint(core, made.id)
    response.headers.update(checkpoint_location(row.id))
    return checkpoint_out(core, row, content)


@router.get("/checkpoints", response_model=schemas.CheckpointPageOut)
def list_checkpoints(
    core: CoreDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="checkpoints to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_CHECKPOINT_PAGE, description="most checkpoints to return")] = 100,
) -> dict[str, Any]:
    """Checkpoints, newest first, a page at a time (like the tensor list): `total` counts them all."""
    total, pairs = svc.checkpoint_page(core, offset=offset, limit=limit)
    return {"total": total, "offset": offset, "limit": limit, "items": checkpoints_out(core, pairs)}


@router.get("/checkpoints/{checkpoint_id}", response_model=schemas.CheckpointDetailOut, responses=ERRORS)
def get_checkpoint(checkpoint_id: str, core: CoreDep) -> dict[str, Any]:
    """One checkpoint: its roots (the tensor dicts of a nested file), metadata, reader warnings,
    files, provenance (of an export or copy) and, for pickled formats, what the pickle names."""
    row, content = svc.get_checkpoint(core, checkpoint_id)
    files = [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in svc.files_of(core, content.key)]
    return checkpoint_out(core, row, content) | {
        "default_root": content.default_root,
        "roots": content.roots,
        "metadata": content.meta,
        "warnings": content.warnings,
        "files": files,
        "stats_error": content.stats_error,
        "provenance": row.provenance,
        "pickle": content.pickle_report,
    }


@router.patch(
    "/checkpoints/{checkpoint_id}",
    response_model=schemas.CheckpointOut,
    responses={**ERRORS, 422: {**PROBLEM, "description": "name empty, longer than 200 characters or not text"}},
)
def rename_checkpoint(checkpoint_id: str, body: schemas.CheckpointPatch, core: CoreDep) -> dict[str, Any]:
    """Rename (relabel) a checkpoint: `{"name": "..."}`. Its id, content and files stay."""
    row, content = svc.rename_checkpoint(core, checkpoint_id, body.name)
    return checkpoint_out(core, row, content)


@router.delete("/checkpoints/{checkpoint_id}", status_code=204, responses=ERRORS)
def delete_checkpoint(checkpoint_id: str, core: CoreDep) -> Response:
    """Delete a checkpoint; its bytes and stats go with the last checkpoint of that content."""
    svc.delete_checkpoint(core, checkpoint_id)
    return Response(status_code=204)


CACHED: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    304: {"description": "`If-None-Match` names the current ETag (set once the stats are done)"},
}


@router.get("/checkpoints/{checkpoint_id}/tree", response_model=schemas.TreeOut, responses=CACHED)
def get_tree(
    checkpoint_id: str,
    request: Request,
    response: Response,
    core: CoreDep,
    root: RootQuery = None,
    path: Annotated[
        str, Query(max_length=schemas.MAX_TEXT, description="dotted module path of the subtree to return")
    ] = "",
    depth: Annotated[
        int | None, Query(ge=0, le=MAX_DEPTH, description="levels of children to include; all when omitted")
    ] = None,
) -> Any:
    """The module tree with roll-ups (tensor count, parameters, bytes, dtype mix, NaN/Inf totals;
    once the stats are done, findings by severity and the layers that look untrained). Once the
    stats are done: an `ETag` and `Cache-Control: immutable` (304 on `If-None-Match`)."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    thresholds = core.settings.findings_threshold_values  # they shape the findings roll-ups
    validators = caching.content_validators(
        request, content, schemas.TreeOut, root=root, path=path, depth=depth, thresholds=thresholds
    )
    unchanged = validators.not_modified(request, lambda: svc.module_node(core, content, root, path))
    if unchanged is not None:
        return unchanged
    validators.apply(response)
    node = svc.module_node(core, content, root, path)
    tree = identity_svc.decorate_tree(core, content, root, node.to_json(depth))
    if content.stats_state == StatsState.DONE:  # the insights of finished stats (cached): no cost per poll
        insights_svc.decorate_tree(tree, insights_svc.checkpoint_insights(core, content, root))
    return {"root": root, "stats_state": content.stats_state, "tree": tree}


@router.get("/checkpoints/{checkpoint_id}/tensors", response_model=schemas.TensorPageOut, responses=CACHED)
def list_tensors(
    checkpoint_id: str,
    request: Request,
    core: CoreDep,
    root: RootQuery = None,
    prefix: Annotated[
        str, Query(max_length=schemas.MAX_TEXT, description="only names starting with this (e.g. 'encoder.')")
    ] = "",
    search: Annotated[
        str, Query(max_length=schemas.MAX_TEXT, description="only names containing this (case-insensitive)")
    ] = "",
    kind: Annotated[schemas.TensorKind | None, Query(description="only parameters, buffers or aliases")] = None,
    nonfinite: Annotated[bool, Query(description="only tensors with NaN or Inf")] = False,
    sort: Annotated[schemas.SortKey, Query(description="the column to sort by")] = "position",
    desc: bool = False,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
) -> Any:
    """Tensors with their stats (`stats` is null while the stats job is still running). Once the
    stats are done: an `ETag` and `Cache-Control: immutable` (304 on `If-None-Match`)."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    svc.check_sort(sort)
    query = {"prefix": prefix, "search": search, "kind": kind, "nonfinite": nonfinite, "sort": sort, "desc": desc}
    validators = caching.content_validators(
        request, content, schemas.TensorPageOut, root=root, query=query, offset=offset, limit=limit
    )
    unchanged = validators.not_modified(request)
    if unchanged is not None:
        return unchanged
    head = {"offset": offset, "limit": limit, "stats_state": content.stats_state}
    # written from the catalogue's columns (tensor_rows.py: the stored histograms are copied, not
    # parsed and encoded again; the rows of finished stats are kept); the schema above documents it
    body = tensor_rows.page_json(
        core.queries,
        content,
        root,
        head=head,
        prefix=prefix,
        search=search,
        kind=kind,
        only_nonfinite=nonfinite,
        sort=sort,
        descending=desc,
        offset=offset,
        limit=limit,
    )
    return Response(body, media_type="application/json", headers=validators.headers())


# The preview and spectrum routes come before /tensors/{name:path}, which would otherwise take
# their URLs for tensor names ending in /preview.png or /spectrum.
NO_PREVIEW: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    422: {**PROBLEM, "description": "the tensor has none (0-d, empty, complex, undecodable, too big) or a bad option"},
}


@router.get(
    "/checkpoints/{checkpoint_id}/tensors/{name:path}/preview.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the preview as a PNG image"}, **NO_PREVIEW},
)
def get_preview(
    checkpoint_id: str,
    name: str,
    core: CoreDep,
    request: Request,
    root: RootQuery = None,
    reduce: Annotated[
        schemas.PreviewReduce, Query(description="block mean, or the block's value of largest magnitude")
    ] = "mean",
    index: Annotated[
        str | None,
        Query(
            max_length=1300,
            description="leading indices of a slice, e.g. 0,3 (a conv weight [out, in, kh, kw] -> w[0, 3])",
        ),
    ] = None,
) -> Response:
    """The tensor as a PNG: a 2-D tensor as a heatmap of at most 512x512 cells (block mean or block
    value of largest magnitude; a blue-white-red map centred on zero, NaN grey, with a colour bar),
    a 1-D tensor as a line plot (at most 1024 points: block mean and min..max), higher ranks by a
    slice (`index`) or as `[shape[0], prod(shape[1:])]`. Streams the tensor once in bounded memory."""
    from ckptscope.services import previews

    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    leading = previews.parse_index(index)
    etag = previews.preview_etag(content, root, name, reduce, leading)
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        svc.tensor_detail(core, content, root, name)  # still a tensor of this checkpoint
        return Response(status_code=304, headers=headers)
    image = previews.tensor_preview(core, content, root, name, reduce, leading)
    return Response(image.png, media_type="image/png", headers=headers)


@router.get(
    "/checkpoints/{checkpoint_id}/tensors/{name:path}/spectrum",
    response_model=schemas.SpectrumOut,
    responses=NO_PREVIEW,
)
def get_spectrum(checkpoint_id: str, name: str, core: CoreDep, root: RootQuery = None) -> dict[str, Any]:
    """Singular values of a 2-D tensor (a higher rank as `[shape[0], prod(shape[1:])]`) with its
    stable rank and effective rank, computed with torch (on the GPU when the stats device is CUDA)
    and cached. Matrices too big to decompose on request are refused (422, the detail says why)."""
    from ckptscope.services import previews

    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    spectrum, cached = previews.tensor_spectrum(core, content, root, name)
    return {"name": name, "root": root, **spectrum.to_json(), "cached": cached}


@router.get(
    "/checkpoints/{checkpoint_id}/tensors/{name:path}", response_model=schemas.TensorDetailOut, responses=CACHED
)
def get_tensor(
    checkpoint_id: str, name: str, request: Request, response: Response, core: CoreDep, root: RootQuery = None
) -> Any:
    """One tensor with full stats and its 64-bin histogram. Once the stats are done: an `ETag` (304
    on `If-None-Match`) with `Cache-Control: no-cache`, not immutable: `identical_elsewhere` names
    other checkpoints, which come and go."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    info, stats = svc.tensor_detail(core, content, root, name)
    elsewhere = identity_svc.identical_elsewhere(core, checkpoint_id, root, info.name, stats)
    validators = caching.content_validators(
        request, content, schemas.TensorDetailOut, root=root, name=info.name, elsewhere=elsewhere, immutable=False
    )
    unchanged = validators.not_modified(request)
    if unchanged is not None:
        return unchanged
    validators.apply(response)
    types = module_types_under(content.module_types or {}, root)
    return tensor_record(info, stats, parameter_of(content.param_of, root, info.name)) | {
        "stats": stats.to_json() if stats else None,
        "init": insights_svc.init_json(info, stats, types),
        "root": root,
        "stats_state": content.stats_state,
        "identical_elsewhere": elsewhere,
    }


@router.get("/checkpoints/{checkpoint_id}/findings", response_model=schemas.FindingsOut, responses=ERRORS)
def get_findings(checkpoint_id: str, core: CoreDep, root: RootQuery = None) -> dict[str, Any]:
    """Diagnostics (README 'Findings'): NaN/Inf, spikes, exploding or collapsed variance and norm
    outliers against sibling layers, dead or near-zero tensors, untrained layers among trained
    ones; each with its rule, severity, offending values and threshold. Also the roll-up per
    module (findings by severity, layers that look untrained) and the thresholds used."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    found = insights_svc.checkpoint_insights(core, content, root)
    return {"root": root, "stats_state": content.stats_state, **found.to_json()}


DigestPath = Annotated[
    str,
    Path(pattern=DIGEST_PATTERN, description="a digest as the stats give it: 'xxh3-128:' and 32 lower-case hex digits"),
]
DigestLimit = Annotated[int, Query(ge=1, le=identity_svc.MAX_HITS, description="most items to return")]
BAD_DIGEST: dict[int | str, dict[str, Any]] = {422: {**PROBLEM, "description": "not a digest"}}


@router.get(
    "/tensors/by-digest/{digest}", response_model=schemas.TensorsByDigestOut, responses=BAD_DIGEST, tags=["identity"]
)
def tensors_by_digest(digest: DigestPath, core: CoreDep, limit: DigestLimit = 100) -> dict[str, Any]:
    """Every tensor in the catalogue with this content digest (`stats.digest`: dtype, shape and
    logical bytes, the same in any file format), oldest checkpoint first; `total` counts them all.
    An unknown digest gives an empty list."""
    return identity_svc.tensors_with_digest(core, digest, limit)


@router.get(
    "/modules/by-digest/{digest}", response_model=schemas.ModulesByDigestOut, responses=BAD_DIGEST, tags=["identity"]
)
def modules_by_digest(digest: DigestPath, core: CoreDep, limit: DigestLimit = 100) -> dict[str, Any]:
    """Every module in the catalogue with this module digest (README 'Content identity': from its
    tensors' names relative to the module and their digests, so a module matches another at any
    path), oldest checkpoint first. An unknown digest gives an empty list."""
    return identity_svc.modules_with_digest(core, digest, limit)


@router.get("/jobs/{job_id}", response_model=schemas.JobOut, responses=ERRORS, tags=["jobs"])
def get_job(job_id: str, core: CoreDep) -> dict[str, Any]:
    """A stats job: its state, bytes done of total and progress (0 to 1)."""
    return job_out(core.queries.get_job(job_id))


ops_router = APIRouter(prefix="/api/v1", tags=["operations"])


@ops_router.post(
    "/copy",
    response_model=schemas.CopyResult,
    responses={
        201: {"model": schemas.CopyResult, "description": "written: a new checkpoint"},
        422: {**PROBLEM, "description": "strict copy with mismatches (the report is in `report`)"},
        **ERRORS,
    },
)
def copy_modules(body: schemas.CopyRequest, core: CoreDep, request: Request) -> Any:
    """Copy modules from one checkpoint into another, like
    `b.block.load_state_dict(a.block.state_dict(), strict=...)`. The report lists copied, missing,
    unexpected and mis-shaped keys and dtype changes. `dry_run` only reports; a strict copy with any
    mismatch writes nothing (422); otherwise the result is a new checkpoint in the target's format."""
    report, row = ops.copy(
        core,
        body.source,
        body.target,
        body.mapping,
        strict=body.strict,
        dry_run=body.dry_run,
        source_root=body.source_root,
        target_root=body.target_root,
    )
    if row is None:
        if not body.dry_run and body.strict and not report.ok:
            return problem(
                request,
                422,
                "strict copy refused: keys are missing, unexpected or mis-shaped",
                "copy_mismatch",
                report=report.to_json(),
            )
        if not body.dry_run:
            return problem(
                request, 422, "nothing to copy: no source tensor fits the target", "copy_empty", report=report.to_json()
            )
        return {"written": False, "report": report.to_json(), "checkpoint": None}
    row, content = svc.get_checkpoint(core, row.id)
    body_out = {"written": True, "report": report.to_json(), "checkpoint": checkpoint_out(core, row, content)}
    return JSONResponse(
        schemas.CopyResult(**body_out).model_dump(mode="json"), status_code=201, headers=checkpoint_location(row.id)
    )


@ops_router.post(
    "/checkpoints/{checkpoint_id}/check",
    response_model=schemas.CheckResult,
    responses={
        **ERRORS,
        409: {**PROBLEM, "description": "the stats of the checkpoint or the baseline are not computed yet, or failed"},
        422: {**PROBLEM, "description": "a malformed rule, or a baseline rule without a baseline"},
    },
)
def check_rules(checkpoint_id: str, body: schemas.CheckRequest, core: CoreDep) -> dict[str, Any]:
    """The CI gate: check rules (`no-nan`, `max-abs<=X`, `params==N`, `dtype==bf16@prefix`,
    `changed-only=PREFIX,...`, `unchanged=PREFIX,...`, `no-untrained`, `no-findings>=warning`) on a
    checkpoint, against `baseline` where a rule compares. `passed` is true when every rule passes;
    each result names its offending tensors."""
    report = check_svc.check_stored(
        core, checkpoint_id, body.rules, root=body.root, baseline_id=body.baseline, baseline_root=body.baseline_root
    )
    return report.to_json()


@ops_router.post("/checkpoints/{checkpoint_id}/freeze-plan", responses=ERRORS)
def freeze_plan(checkpoint_id: str, body: schemas.FreezeRequest, core: CoreDep) -> dict[str, Any]:
    """Which parameters a freeze of these modules stops training (buffers listed apart), with
    counts, the trainable fraction and a PyTorch snippet that applies the plan."""
    return ops.freeze(core, checkpoint_id, body.freeze, body.root).to_json()


@ops_router.post(
    "/checkpoints/{checkpoint_id}/export", status_code=201, response_model=schemas.ExportResult, responses=ERRORS
)
def export_checkpoint(
    checkpoint_id: str, body: schemas.ExportRequest, core: CoreDep, response: Response
) -> dict[str, Any]:
    """Write the selected tensors as a new partial checkpoint (bytes streamed from the source,
    bit-identical unless `dtype` casts them), stored in the catalogue and downloadable (`Location`
    names it). Quantized GGUF tensors are dequantized (to `dtype`, float32 by default), as
    `dequantized` reports."""
    row, plan = ops.export(
        core,
        checkpoint_id,
        root=body.root,
        include=body.include,
        exclude=body.exclude,
        rename=body.rename,
        fmt=body.format,
        freeze=body.freeze,
        dtype=body.dtype,
    )
    row, content = svc.get_checkpoint(core, row.id)
    response.headers.update(checkpoint_location(row.id))
    return checkpoint_out(core, row, content) | {
        "freeze_plan": plan.to_json() if plan else None,
        "dequantized": (row.provenance or {}).get("dequantized"),
    }


@ops_router.get(
    "/checkpoints/{checkpoint_id}/download",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the file's bytes (`Content-Disposition` names it)",
        },
        **ERRORS,
    },
)
def download(
    checkpoint_id: str,
    core: CoreDep,
    file: Annotated[str | None, Query(description="file name, for a sharded set")] = None,
) -> FileResponse:
    """The checkpoint's file as stored (bit-identical to the upload or the export); a sharded set
    one file at a time (`?file=`)."""
    path, name = ops.download(core, checkpoint_id, file)
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@ops_router.get("/diff", responses=ERRORS)
def diff(core: CoreDep, a: str, b: str, a_root: str | None = None, b_root: str | None = None) -> dict[str, Any]:
    """Compare two checkpoints: only-in-A, only-in-B, shape/dtype changes, and for common tensors
    max |a-b|, relative L2 difference, cosine similarity and an identical flag, rolled up the tree."""
    return ops.diff(core, a, b, a_root, b_root)
