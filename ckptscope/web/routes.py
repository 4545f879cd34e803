"""Pages and htmx fragments. Every URL that htmx pushes into history renders as a full page."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from ckptscope import __version__
from ckptscope.errors import Invalid, NotFound
from ckptscope.http import csrf
from ckptscope.http.deps import MAX_PAGE, CoreDep
from ckptscope.http.uploads import receive_uploads
from ckptscope.services import catalogue_ops as ops
from ckptscope.services import checkpoints as svc
from ckptscope.services.operations import Renamer
from ckptscope.services.selection import normalize_mapping, parse_pairs

from .templating import is_htmx, render

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 50
MAX_SELECTED = 10_000  # modules/tensors ticked, and rename pairs, in one operation form
CSRF = [Depends(csrf.require_csrf)]  # the UI's state-changing routes (the upload checks it itself)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, core: CoreDep) -> Response:
    items = svc.list_checkpoints(core)
    block = "checkpoint_list" if request.headers.get("HX-Target") == "checkpoint-list" else None
    return render(
        request,
        "home.html",
        {"items": items, "version": __version__, "max_upload": core.settings.max_upload_bytes},
        block,
    )


@router.post("/upload")
async def upload(request: Request, core: CoreDep) -> Response:
    header = request.headers.get(csrf.HEADER)
    if header is not None and not csrf.matches(request, header):
        raise csrf.refused()
    expected = None
    if header is None:  # a plain form: its csrf_token field must come before the files
        expected = csrf.cookie_token(request)
        if expected is None:
            raise csrf.refused()
    uploads, fields = await receive_uploads(core, request, None, csrf_token=expected)
    row = await run_in_threadpool(svc.ingest, core, uploads, name=fields.get("name") or None)  # parses in a sandbox
    url = f"/checkpoints/{row.id}"
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@router.delete("/checkpoints/{checkpoint_id}", dependencies=CSRF)
def delete(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    svc.delete_checkpoint(core, checkpoint_id)
    return render(request, "home.html", {"items": svc.list_checkpoints(core)}, "checkpoint_list")


@router.get("/checkpoints/{checkpoint_id}", response_class=HTMLResponse)
def checkpoint_page(
    request: Request,
    checkpoint_id: str,
    core: CoreDep,
    root: str | None = None,
    tensor: str | None = None,
    q: str = "",
    kind: Annotated[str, Query(pattern="^(|parameter|buffer|alias)$")] = "",
    nonfinite: bool = False,
    sort: str = "position",
    desc: bool = False,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
) -> Response:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    params = {
        "root": root if root != content.default_root else None,
        "q": q,
        "kind": kind,
        "nonfinite": nonfinite,
        "sort": sort if sort != "position" else None,
        "desc": desc,
    }
    table = svc.tensor_page(
        core,
        content,
        root,
        search=q,
        kind=kind or None,
        only_nonfinite=nonfinite,
        sort=sort,
        descending=desc,
        offset=(page - 1) * PAGE_SIZE,
        limit=PAGE_SIZE,
    )
    detail = None
    detail_error = None
    if tensor is not None:
        try:
            detail = svc.tensor_detail(core, content, root, tensor)
        except NotFound as exc:
            detail_error = exc.detail
    context = {
        "ckpt": row,
        "content": content,
        "root": root,
        "params": params,
        "page": page,
        "pages": max(1, -(-table.total // PAGE_SIZE)),
        "table": table,
        "tree": svc.module_tree(core, content, root),
        "detail": detail,
        "detail_error": detail_error,
        "selected": tensor,
        "progress": svc.progress(core, content),
        "files": svc.files_of(core, content.key),
        "others": [other for other, _ in svc.list_checkpoints(core) if other.id != row.id],
    }
    target = request.headers.get("HX-Target") if is_htmx(request) else None
    block = {"detail": "detail", "tensor-table": "tensor_table"}.get(target or "")
    return render(request, "checkpoint.html", context, block)


@router.get("/checkpoints/{checkpoint_id}/tree", response_class=HTMLResponse)
def tree_children(
    request: Request, checkpoint_id: str, core: CoreDep, root: str | None = None, path: str = ""
) -> Response:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    node = svc.module_node(core, content, root, path)
    params = {"root": root if root != content.default_root else None}
    context = {"ckpt": row, "node": node, "params": params, "offset": 0}
    return render(request, "checkpoint.html", context, "tree_children")


@router.get("/checkpoints/{checkpoint_id}/progress", response_class=HTMLResponse)
def progress(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    state = svc.progress(core, content)
    headers = {"HX-Trigger": "stats-ready"} if state is None else None
    return render(
        request, "checkpoint.html", {"ckpt": row, "progress": state, "just_finished": True}, "progress", headers=headers
    )


def _pairs(text: str) -> dict[str, str]:
    """'encoder.=backbone., module.=' (comma or space separated) -> a prefix mapping."""
    pairs = text.replace(",", " ").split()
    if len(pairs) > MAX_SELECTED:
        raise Invalid(f"at most {MAX_SELECTED} renames at once")
    return parse_pairs(pairs)


async def _selection(request: Request) -> tuple[FormData, list[str], str | None]:
    form = await request.form()
    modules = [str(m) for m in form.getlist("module")]
    if not modules:
        raise Invalid("tick at least one module or tensor in the tree first")
    if len(modules) > MAX_SELECTED:
        raise Invalid(f"at most {MAX_SELECTED} modules or tensors at once")
    root = form.get("root")
    return form, modules, str(root) if root is not None else None


def _go_to(request: Request, checkpoint_id: str) -> Response:
    url = f"/checkpoints/{checkpoint_id}"
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@router.post("/checkpoints/{checkpoint_id}/freeze", response_class=HTMLResponse, dependencies=CSRF)
async def freeze(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    _, modules, root = await _selection(request)
    plan = await run_in_threadpool(ops.freeze, core, checkpoint_id, modules, root)
    context = {"plan": plan, "plan_json": json.dumps(plan.to_json(with_snippet=False), indent=2)}
    return render(request, "checkpoint.html", context, "ops_result")


@router.post("/checkpoints/{checkpoint_id}/export", dependencies=CSRF)
async def export(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    form, modules, root = await _selection(request)
    fmt = str(form.get("format") or "safetensors")
    freeze = modules if form.get("embed_freeze") else []
    row, _ = await run_in_threadpool(
        ops.export,
        core,
        checkpoint_id,
        root=root,
        include=modules,
        rename=_pairs(str(form.get("rename") or "")),
        fmt=fmt,
        freeze=freeze,
        dtype=str(form.get("dtype") or "") or None,
    )
    return _go_to(request, row.id)


@router.post("/checkpoints/{checkpoint_id}/copy", response_class=HTMLResponse, dependencies=CSRF)
async def copy(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    form, modules, root = await _selection(request)
    target = str(form.get("target") or "")
    if not target:
        raise Invalid("choose a target checkpoint to copy into")
    renames = Renamer(normalize_mapping(_pairs(str(form.get("copy_rename") or ""))))
    mapping = {m: renames(m) or m for m in modules}
    strict = bool(form.get("strict"))
    dry_run = form.get("action") != "copy"
    report, row = await run_in_threadpool(
        ops.copy, core, checkpoint_id, target, mapping, strict=strict, dry_run=dry_run, source_root=root
    )
    if row is not None:
        return _go_to(request, row.id)
    refused = None
    if not dry_run:
        refused = (
            "strict copy refused: untick 'strict' to copy what fits"
            if strict and not report.ok
            else "nothing to copy: no selected tensor fits the target"
        )
    context = {"report": report.to_json(), "written": False, "refused": refused}
    return render(request, "checkpoint.html", context, "ops_result")


@router.get("/compare", response_class=HTMLResponse)
def compare(
    request: Request,
    core: CoreDep,
    a: str | None = None,
    b: str | None = None,
    show: Annotated[str, Query(pattern="^(changed|all)$")] = "changed",
) -> Response:
    items = svc.list_checkpoints(core)
    result = ops.diff(core, a, b) if a and b else None
    rows = None
    if result is not None:
        rows = [r for r in result["tensors"] if show == "all" or r["status"] != "identical"]
    return render(
        request, "compare.html", {"items": items, "a": a, "b": b, "result": result, "rows": rows, "show": show}
    )


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request) -> Response:
    return render(request, "docs.html", {})
