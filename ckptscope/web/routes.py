"""Pages and htmx fragments. Every URL that htmx pushes into history renders as a full page."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from ckptscope import __version__
from ckptscope.errors import Invalid, NotFound
from ckptscope.formats.model import module_types_under
from ckptscope.http import csrf
from ckptscope.http.deps import MAX_PAGE, CoreDep
from ckptscope.http.uploads import receive_uploads
from ckptscope.insights.findings import SEVERITIES
from ckptscope.services import catalogue_ops as ops
from ckptscope.services import checkpoints as svc
from ckptscope.services import identity, references
from ckptscope.services import values as tensor_values
from ckptscope.services.insights import (
    Insights,
    cached_insights,
    checkpoint_insights,
    prepare_checkpoint_view,
    tensor_init,
)
from ckptscope.services.local_bytes import local_tensor
from ckptscope.services.operations import Renamer
from ckptscope.services.selection import normalize_mapping, parse_pairs

from .charts import HistogramView, histogram_view
from .templating import is_htmx, query, render

if TYPE_CHECKING:
    from ckptscope.core import Core
    from ckptscope.formats import TensorInfo
    from ckptscope.insights.init_verdict import InitVerdict
    from ckptscope.stats import TensorStats, TreeNode
    from ckptscope.store.catalogue import Content

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 50
PAGE_SIZES = (50, 100, 250, 500)  # the tensor table's rows-per-page choices; the largest bounds ?size=
INLINE_TREE_TENSORS = 2_000  # up to this many tensors the page waits for its tree and insights (built in ms)
MAX_TREE_PATHS = 2_000  # modules a tree refresh renders expanded (the page sends those it has open)
MAX_SELECTED = 10_000  # modules/tensors ticked, and rename pairs, in one operation form
CREATED_COOKIE = "ckptscope_created"  # flash: the checkpoint an export or copy just wrote
CSRF = [Depends(csrf.require_csrf)]  # the UI's state-changing routes (the upload checks it itself)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, core: CoreDep) -> Response:
    items = svc.list_checkpoints(core)
    block = "checkpoint_list" if request.headers.get("HX-Target") == "checkpoint-list" else None
    return render(
        request,
        "home.html",
        {
            "items": items,
            "version": __version__,
            "max_upload": core.settings.max_upload_bytes,
            "sources": {"roots": bool(core.settings.source_roots), "buckets": bool(core.settings.source_buckets)},
        },
        block,
    )


@router.post("/reference", dependencies=CSRF)
def reference(
    request: Request,
    core: CoreDep,
    source: Annotated[str, Form(min_length=1, max_length=4096)],
    name: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Open a checkpoint where it lives (the form beside the upload): registered, not copied."""
    row = references.register_reference(core, source.strip(), name or None)
    url = f"/checkpoints/{row.id}"
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


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
    size: Annotated[int, Query(ge=1, le=PAGE_SIZES[-1])] = PAGE_SIZE,
    hist: Annotated[str, Query(pattern="^(|linear|log)$")] = "",
    module: str = "",
) -> Response:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    tensor = tensor or None  # "tensor=" (the detail's close button) selects none
    params = {
        "root": root if root != content.default_root else None,
        "q": q,
        "kind": kind,
        "nonfinite": nonfinite,
        "sort": sort if sort != "position" else None,
        "desc": desc,
        "size": size if size != PAGE_SIZE else None,
        "hist": "log" if hist == "log" else None,  # the histogram's count scale, kept across tensors
    }
    query = {"search": q, "kind": kind or None, "only_nonfinite": nonfinite, "sort": sort, "descending": desc}
    table = svc.tensor_page(core, content, root, **query, offset=(page - 1) * size, limit=size)
    pages = max(1, -(-table.total // size))
    if page > pages:  # past the end (the filter shrank the list, or an old link): show the last page
        page = pages
        table = svc.tensor_page(core, content, root, **query, offset=(page - 1) * size, limit=size)
    detail = None
    detail_error = None
    if tensor is not None:
        try:
            detail = svc.tensor_detail(core, content, root, tensor)
        except NotFound as exc:
            detail_error = exc.detail
    tree, found = _tree_and_insights(core, content, root)
    tree_open = _module_chain(module) if module else ()  # ?module=: the tree opened down to it (a findings link)
    context = {
        "insights": found,
        "detail_init": _detail_init(core, content, root, detail, found),
        "tree_open": tree_open,
        # the tree (and the facts it gives) not built yet: the page comes without them, and this loads them
        "tree_url": None if tree is not None else _tree_url(row.id, params, module, tree_open, tensor),
        "target_module": module or None,
        "ckpt": row,
        "content": content,
        "source": references.source_of(row),
        "created": request.cookies.get(CREATED_COOKIE) == row.id,  # just written by an export or a copy
        "params_by_dtype": svc.params_by_dtype(tree) if tree is not None else None,
        "root": root,
        "params": params,
        "page": page,
        "pages": pages,
        "page_links": page_links(page, pages),
        "size": size,
        "page_sizes": PAGE_SIZES,
        "table": table,
        "tree": tree,
        "detail": detail,
        "detail_error": detail_error,
        "histogram": _histogram(core, content, detail, log=hist == "log"),
        # _identical.html: the other catalogue tensors identical to the shown one (by digest)
        "identical": identity.identical_elsewhere(core, row.id, root, detail[0].name, detail[1]) if detail else None,
        "selected": tensor,
        "progress": svc.progress(core, content),
        "files": svc.files_of(core, content.key),
        "others": [(other, c) for other, c in svc.list_checkpoints(core) if other.id != row.id],
    }
    target = request.headers.get("HX-Target") if is_htmx(request) else None
    block = {"detail": "detail", "tensor-table": "tensor_table"}.get(target or "")
    response = render(request, "checkpoint.html", context, block)
    if tree is None:  # the tree and insights the page came without: computed once it is sent
        response.background = BackgroundTask(prepare_checkpoint_view, core, content, root)
    if context["created"] and block is None:  # the message shows once
        response.delete_cookie(CREATED_COOKIE, path=f"/checkpoints/{row.id}")
    return response


def _tree_and_insights(core: Core, content: Content, root: str) -> tuple[TreeNode | None, Insights | None]:
    """The module tree and the insights the page shows. A big checkpoint whose tree or insights are
    not ready yet (the first view after a start) gets (None, None): the page does not wait for them
    but loads them after itself (``tree_url``); they are prepared once the page is sent."""
    stats_done = svc.progress(core, content) is None  # insights are shown once the stats are done
    tree = svc.built_module_tree(core, content, root)
    found = cached_insights(core, content, root) if stats_done else None
    ready = tree is not None and (found is not None or not stats_done)
    if not ready and content.tensor_count > INLINE_TREE_TENSORS:
        return None, None
    if tree is None:
        tree = svc.module_tree(core, content, root)
    if found is None and stats_done:
        found = checkpoint_insights(core, content, root)
    return tree, found


def _tree_url(
    checkpoint_id: str, params: dict[str, Any], module: str, opened: tuple[str, ...], tensor: str | None
) -> str:
    """The tree fragment a page without its tree loads: the whole tree with the header's facts,
    opened down to ``module`` (a findings link) and with the selected tensor marked."""
    extra: list[tuple[str, str]] = [("facts", "true")]
    if module:
        extra.append(("module", module))
    if tensor:
        extra.append(("tensor", tensor))
    extra += [("open", p) for p in opened]
    base = query({"root": params["root"]})
    return f"/checkpoints/{checkpoint_id}/tree?" + "&".join(x for x in (base, urlencode(extra)) if x)


def _detail_init(
    core: Core,
    content: Content,
    root: str,
    detail: tuple[TensorInfo, TensorStats | None] | None,
    found: Insights | None,
) -> InitVerdict | None:
    """The shown tensor's init verdict once the stats are done: the insights' own, or (a page that
    did not wait for the insights) the same verdict judged for this one tensor (``tensor_init``)."""
    if detail is None or svc.progress(core, content) is not None:
        return None
    info, stats = detail
    if found is not None:
        return found.init.get(info.name)
    return tensor_init(info, stats, module_types_under(content.module_types or {}, root))


def _histogram(
    core: Core, content: Content, detail: tuple[TensorInfo, TensorStats | None] | None, *, log: bool
) -> HistogramView | None:
    """The detail panel's chart: a tiny tensor's values and few distinct values are read from its file."""
    if detail is None:
        return None
    info, stats = detail
    if stats is None:
        return None
    if tensor_values.reads_values(info, stats):
        with local_tensor(core, content.key, info) as local:
            values = tensor_values.tensor_values(local, stats)
    else:
        values = tensor_values.tensor_values(info, stats)
    return histogram_view(
        stats,
        log=log,
        name=info.name,
        category=values.category,
        distinct=values.distinct,
        values=values.values,
        shape=info.shape,
    )


@router.get("/checkpoints/{checkpoint_id}/tree", response_class=HTMLResponse)
def tree_children(
    request: Request,
    checkpoint_id: str,
    core: CoreDep,
    root: str | None = None,
    path: str = "",
    expand: Annotated[list[str] | None, Query(max_length=MAX_TREE_PATHS)] = None,
    opened: Annotated[list[str] | None, Query(alias="open", max_length=MAX_TREE_PATHS)] = None,
    facts: bool = False,
    module: str = "",
    tensor: str | None = None,
) -> Response:
    """The children of one module (lazily, as a module is opened), or the whole tree again when the
    stats are ready: then ``expand`` names the modules whose children the page had loaded (rendered
    inline, so ticked boxes inside survive) and ``open`` those shown open. ``facts``: also the
    header's facts the tree gives (an out-of-band swap), for a page that came without its tree;
    ``module``: the module a findings link points at, ``tensor``: the selected tensor."""
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    node = svc.module_node(core, content, root, path)
    params = {"root": root if root != content.default_root else None}
    shown_open = frozenset(opened or ())
    loader = facts and not path  # the tree of a page that came without it
    # that page shows the tree as soon as it is built: the badges follow once the insights are
    # (``insights_ready``); any other tree request waits for them
    found = cached_insights(core, content, root) if loader else _insights(core, content, root)
    pending = loader and found is None and svc.progress(core, content) is None
    context: dict[str, Any] = {
        "insights": found,
        "ckpt": row,
        "node": node,
        "params": params,
        "offset": 0,
        "expand": frozenset(expand or ()) | shown_open,
        "open_paths": shown_open,
        "target_module": module or None,
        "selected": tensor or None,
        "insights_pending": pending,
    }
    blocks = ["insights_pending", "tree_children"]
    if loader:
        tree = svc.module_tree(core, content, root)
        context |= {
            "oob": True,
            "tree": tree,
            "params_by_dtype": svc.params_by_dtype(tree),
            "content": content,
            "root": root,
        }
        blocks.append("facts")
    return render(request, "checkpoint.html", context, blocks)


@router.get("/checkpoints/{checkpoint_id}/insights-ready")
def insights_ready(checkpoint_id: str, core: CoreDep, root: str | None = None) -> Response:
    """Answers once the insights of a root are computed (computing them, or waiting for the
    computation under way), with an ``insights-ready`` event: a tree shown without its badges then
    loads again with them."""
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    _insights(core, content, root)
    return Response(status_code=204, headers={"HX-Trigger": "insights-ready"})


def _insights(core: Core, content: Content, root: str) -> Insights | None:
    """Findings, init verdicts and module roll-ups for the tree badges and the detail, once the
    stats are done (before, the tree and the detail come back on stats-ready anyway)."""
    if svc.progress(core, content) is not None:
        return None
    return checkpoint_insights(core, content, root)


def _module_chain(path: str) -> tuple[str, ...]:
    """A module and the modules above it: ``a.b.c`` -> ``("a", "a.b", "a.b.c")``."""
    parts = path.split(".")
    return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))


@router.get("/checkpoints/{checkpoint_id}/findings", response_class=HTMLResponse)
def findings(request: Request, checkpoint_id: str, core: CoreDep, root: str | None = None) -> Response:
    """The findings panel, loaded by htmx after the page (and again on stats-ready), so the page
    never waits for the rules."""
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    if cached_insights(core, content, root) is None:
        # a first view: the page shows its tree first (the same CPU would build both at once and
        # the tree later), so the rules wait for it (built once; this page needs it anyway)
        svc.module_tree(core, content, root)
    found = checkpoint_insights(core, content, root)
    rank = {sev: i for i, sev in enumerate(reversed(SEVERITIES))}  # errors first
    context = {
        "ckpt": row,
        "params": {"root": root if root != content.default_root else None},
        "insights": found,
        "findings": sorted(found.findings, key=lambda f: rank.get(f.severity, len(rank))),
        "stats": svc.progress(core, content),  # None when done, else {"state": "pending" | "running" | "failed", …}
    }
    return render(request, "checkpoint.html", context, "findings")


def page_links(page: int, pages: int, around: int = 2) -> list[int | None]:
    """The pager's page numbers: the first, the last and a window around the current one; None
    marks a gap (shown as an ellipsis)."""
    shown = sorted({1, pages, *range(max(1, page - around), min(pages, page + around) + 1)})
    links: list[int | None] = []
    for n in shown:
        if links and n - (links[-1] or 0) > 1:
            links.append(None)
        links.append(n)
    return links


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


def _go_to(request: Request, checkpoint_id: str, *, created: bool = False) -> Response:
    """To a checkpoint's page; ``created``: the page then says what was just written (a flash
    cookie scoped to that page, read and cleared there once; the URL stays the checkpoint's own)."""
    url = f"/checkpoints/{checkpoint_id}"
    response: Response
    if is_htmx(request):
        response = Response(status_code=200, headers={"HX-Redirect": url})
    else:
        response = RedirectResponse(url, status_code=303)
    if created:
        secure = request.url.scheme == "https"
        response.set_cookie(
            CREATED_COOKIE, checkpoint_id, max_age=300, path=url, httponly=True, samesite="strict", secure=secure
        )
    return response


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
    return _go_to(request, row.id, created=True)


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
        return _go_to(request, row.id, created=True)
    refused = None
    if not dry_run:
        refused = (
            "strict copy refused: untick 'strict' to copy what fits"
            if strict and not report.ok
            else "nothing to copy: no selected tensor fits the target"
        )
    context = {"report": report.to_json(), "written": False, "refused": refused}
    return render(request, "checkpoint.html", context, "ops_result")


@router.post("/checkpoints/{checkpoint_id}/rename", dependencies=CSRF)
async def rename(request: Request, checkpoint_id: str, core: CoreDep) -> Response:
    form = await request.form()
    await run_in_threadpool(svc.rename_checkpoint, core, checkpoint_id, str(form.get("name") or ""))
    return _go_to(request, checkpoint_id)


@router.get("/compare", response_class=HTMLResponse)
def compare(
    request: Request,
    core: CoreDep,
    a: str | None = None,
    b: str | None = None,
    show: Annotated[str, Query(pattern="^(changed|all)$")] = "changed",
    pick: Annotated[list[str] | None, Query(max_length=100)] = None,
) -> Response:
    """A and B start empty, or as the two checkpoints ticked on the home list (``pick``; the older
    one is A); never a default pair."""
    items = svc.list_checkpoints(core)
    picked = [p for p in pick or [] if p]
    pick_error = None
    if picked and not (a or b):
        if len(picked) == 2:
            order = {row.id: i for i, (row, _) in enumerate(items)}  # newest first
            b, a = sorted(picked, key=lambda p: order.get(p, -1))
        else:
            pick_error = f"tick exactly two checkpoints to compare ({len(picked)} ticked)"
    result = ops.diff(core, a, b) if a and b else None
    rows = None
    if result is not None:
        rows = [r for r in result["tensors"] if show == "all" or r["status"] != "identical"]
    context = {"items": items, "a": a, "b": b, "result": result, "rows": rows, "show": show, "pick_error": pick_error}
    return render(request, "compare.html", context)


# --- the detail panel's preview and spectrum (_preview.html); the tensor is a query parameter, so
# any name (dots, slashes, "..") makes a working URL ---------------------------------------------


@router.get("/checkpoints/{checkpoint_id}/preview.png")
def preview_png(
    checkpoint_id: str,
    core: CoreDep,
    tensor: str,
    root: str | None = None,
    reduce: Annotated[str, Query(pattern="^(mean|absmax)$")] = "mean",
    index: Annotated[str | None, Query(max_length=1300)] = None,
) -> Response:
    from ckptscope.services import previews

    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    image = previews.tensor_preview(core, content, root, tensor, reduce, previews.parse_index(index))
    return Response(image.png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/checkpoints/{checkpoint_id}/preview", response_class=HTMLResponse)
def preview_fragment(
    request: Request,
    checkpoint_id: str,
    core: CoreDep,
    tensor: str,
    root: str | None = None,
    reduce: Annotated[str, Query(pattern="^(mean|absmax)$")] = "mean",
) -> Response:
    from ckptscope.services import previews

    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    view = previews.preview_view(core, content, root, tensor, reduce)
    context = {"ckpt": row, "root": root, "selected": tensor, "preview": view}
    return render(request, "_preview.html", context, "preview")


@router.get("/checkpoints/{checkpoint_id}/spectrum", response_class=HTMLResponse)
def spectrum_fragment(
    request: Request, checkpoint_id: str, core: CoreDep, tensor: str, root: str | None = None
) -> Response:
    from ckptscope.services import previews

    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    view = previews.spectrum_view(core, content, root, tensor)
    context = {"ckpt": row, "root": root, "selected": tensor, "spectrum": view}
    return render(request, "_preview.html", context, "spectrum")


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request) -> Response:
    return render(request, "docs.html", {})
