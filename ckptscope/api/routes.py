"""``/api/v1``: thin JSON routes over the services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ckptscope.core import Core
from ckptscope.http.deps import MAX_DEPTH, MAX_OFFSET, CoreDep, RootQuery
from ckptscope.http.problems import problem
from ckptscope.http.uploads import receive_uploads
from ckptscope.services import catalogue_ops as ops
from ckptscope.services import checkpoints as svc
from ckptscope.services.inspect import parameter_of, tensor_record
from ckptscope.store.catalogue import Checkpoint, Content, Job, JobState
from ckptscope.store.queries import SORTABLE

from . import schemas

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
        }
        for row, content in pairs
    ]


def checkpoint_out(core: Core, row: Checkpoint, content: Content) -> dict[str, Any]:
    return checkpoints_out(core, [(row, content)])[0]


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
        413: {**PROBLEM, "description": "upload larger than CKPTSCOPE_MAX_UPLOAD_BYTES"},
        422: {**PROBLEM, "description": "not a readable checkpoint (the detail says why)"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "name": {"type": "string"},
                        },
                        "required": ["file"],
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def upload_checkpoint(
    request: Request,
    core: CoreDep,
    filename: Annotated[str | None, Query(description="display name for a raw (non-multipart) body")] = None,
) -> dict[str, Any]:
    """Upload a checkpoint: multipart field `file` (repeat it for a sharded set with its index) or
    the raw file as the body with `?filename=`. Stats are computed in the background."""
    uploads, fields = await receive_uploads(core, request, filename)
    row = await run_in_threadpool(svc.ingest, core, uploads, name=fields.get("name") or None)  # parses in a sandbox
    row, content = svc.get_checkpoint(core, row.id)
    return checkpoint_out(core, row, content)


@router.get("/checkpoints", response_model=list[schemas.CheckpointOut])
def list_checkpoints(core: CoreDep) -> list[dict[str, Any]]:
    return checkpoints_out(core, svc.list_checkpoints(core))


@router.get("/checkpoints/{checkpoint_id}", response_model=schemas.CheckpointDetailOut, responses=ERRORS)
def get_checkpoint(checkpoint_id: str, core: CoreDep) -> dict[str, Any]:
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
    svc.delete_checkpoint(core, checkpoint_id)
    return Response(status_code=204)


@router.get("/checkpoints/{checkpoint_id}/tree", response_model=schemas.TreeOut, responses=ERRORS)
def get_tree(
    checkpoint_id: str,
    core: CoreDep,
    root: RootQuery = None,
    path: Annotated[str, Query(description="dotted module path of the subtree to return")] = "",
    depth: Annotated[
        int | None, Query(ge=0, le=MAX_DEPTH, description="levels of children to include; all when omitted")
    ] = None,
) -> dict[str, Any]:
    """The module tree with roll-ups (tensor count, parameters, bytes, dtype mix, NaN/Inf totals)."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    node = svc.module_node(core, content, root, path)
    return {"root": root, "stats_state": content.stats_state, "tree": node.to_json(depth)}


@router.get("/checkpoints/{checkpoint_id}/tensors", response_model=schemas.TensorPageOut, responses=ERRORS)
def list_tensors(
    checkpoint_id: str,
    core: CoreDep,
    root: RootQuery = None,
    prefix: Annotated[str, Query(description="only names starting with this (e.g. 'encoder.')")] = "",
    search: Annotated[str, Query(description="only names containing this (case-insensitive)")] = "",
    kind: Annotated[str | None, Query(pattern="^(parameter|buffer|alias)$")] = None,
    nonfinite: Annotated[bool, Query(description="only tensors with NaN or Inf")] = False,
    sort: Annotated[str, Query(description=f"one of {', '.join(SORTABLE)}")] = "position",
    desc: bool = False,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
) -> Any:
    """Tensors with their stats (`stats` is null while the stats job is still running)."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    page = svc.tensor_page(
        core,
        content,
        root,
        prefix=prefix,
        search=search,
        kind=kind,
        only_nonfinite=nonfinite,
        sort=sort,
        descending=desc,
        offset=offset,
        limit=limit,
    )
    # built as plain JSON (the schema above documents it): validating thousands of rows through
    # pydantic again would double the time of a page of stats
    return JSONResponse(
        {
            "root": root,
            "total": page.total,
            "offset": offset,
            "limit": limit,
            "stats_state": content.stats_state,
            "tensors": [
                tensor_record(t, s, parameter_of(content.param_of, root, t.name))
                | {"stats": s.to_json() if s else None}
                for t, s in page.rows
            ],
        }
    )


@router.get(
    "/checkpoints/{checkpoint_id}/tensors/{name:path}", response_model=schemas.TensorDetailOut, responses=ERRORS
)
def get_tensor(checkpoint_id: str, name: str, core: CoreDep, root: RootQuery = None) -> dict[str, Any]:
    """One tensor with full stats and its 64-bin histogram."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    info, stats = svc.tensor_detail(core, content, root, name)
    return tensor_record(info, stats, parameter_of(content.param_of, root, info.name)) | {
        "stats": stats.to_json() if stats else None,
        "root": root,
        "stats_state": content.stats_state,
    }


@router.get("/jobs/{job_id}", response_model=schemas.JobOut, responses=ERRORS, tags=["jobs"])
def get_job(job_id: str, core: CoreDep) -> dict[str, Any]:
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
    return JSONResponse(schemas.CopyResult(**body_out).model_dump(mode="json"), status_code=201)


@ops_router.post("/checkpoints/{checkpoint_id}/freeze-plan", responses=ERRORS)
def freeze_plan(checkpoint_id: str, body: schemas.FreezeRequest, core: CoreDep) -> dict[str, Any]:
    """Which parameters a freeze of these modules stops training (buffers listed apart), with
    counts, the trainable fraction and a PyTorch snippet that applies the plan."""
    return ops.freeze(core, checkpoint_id, body.freeze, body.root).to_json()


@ops_router.post(
    "/checkpoints/{checkpoint_id}/export", status_code=201, response_model=schemas.ExportResult, responses=ERRORS
)
def export_checkpoint(checkpoint_id: str, body: schemas.ExportRequest, core: CoreDep) -> dict[str, Any]:
    """Write the selected tensors as a new partial checkpoint (bytes streamed from the source,
    bit-identical unless `dtype` casts them), stored in the catalogue and downloadable. Quantized
    GGUF tensors are dequantized (to `dtype`, float32 by default), as `dequantized` reports."""
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
    return checkpoint_out(core, row, content) | {
        "freeze_plan": plan.to_json() if plan else None,
        "dequantized": (row.provenance or {}).get("dequantized"),
    }


@ops_router.get("/checkpoints/{checkpoint_id}/download", response_class=FileResponse, responses=ERRORS)
def download(
    checkpoint_id: str,
    core: CoreDep,
    file: Annotated[str | None, Query(description="file name, for a sharded set")] = None,
) -> FileResponse:
    path, name = ops.download(core, checkpoint_id, file)
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@ops_router.get("/diff", responses=ERRORS)
def diff(core: CoreDep, a: str, b: str, a_root: str | None = None, b_root: str | None = None) -> dict[str, Any]:
    """Compare two checkpoints: only-in-A, only-in-B, shape/dtype changes, and for common tensors
    max |a-b|, relative L2 difference, cosine similarity and an identical flag, rolled up the tree."""
    return ops.diff(core, a, b, a_root, b_root)
