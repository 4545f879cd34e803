"""Catalogue use cases: ingest uploaded blobs, read a checkpoint's tensors, tree and progress,
delete. The SQL lives in ``ckptscope.store.queries``; this module decides what happens."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ckptscope.errors import CheckpointError, Invalid, NotFound
from ckptscope.formats import TensorInfo
from ckptscope.formats.model import module_types_under
from ckptscope.formats.sandbox import open_checkpoint_sandboxed
from ckptscope.stats import TensorStats, TreeNode, build_tree
from ckptscope.store.blobs import Blob
from ckptscope.store.catalogue import Checkpoint, Content, FileRef, StatsState
from ckptscope.store.queries import StoredFile, TensorPage
from ckptscope.store.queries import check_root as check_root  # for the routes
from ckptscope.store.queries import check_sort as check_sort  # for the routes
from ckptscope.text import make_storable, storable_text

from .insights import SingleFlight
from .uploaded_folders import arrange_upload

if TYPE_CHECKING:
    from ckptscope.core import Core


@dataclass(frozen=True, slots=True)
class Upload:
    name: str  # the client's file name: display text and shard name only, never a path
    blob: Blob


def display_name(raw: str | None) -> str:
    """A client-supplied name made safe to show: last path part, no control characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name.strip()[:255] or "upload"


MAX_LABEL = 200  # characters of a checkpoint's name (label)


def checkpoint_label(raw: str) -> str:
    """A name a user gives a checkpoint (upload form, rename): 1..MAX_LABEL characters once trimmed,
    control characters (newlines, tabs) as spaces, NULs and lone surrogates as visible escapes
    (``storable_text``), so any catalogue database can hold it."""
    # counted as the user typed it (the schema's maxLength), before a NUL becomes a 4-character escape
    text = "".join(" " if ch != "\x00" and unicodedata.category(ch) == "Cc" else ch for ch in raw).strip()
    if not 1 <= len(text) <= MAX_LABEL:
        raise Invalid(f"a checkpoint name has 1 to {MAX_LABEL} characters (got {len(text)})")
    return str(storable_text(text))


def named_blobs(uploads: Sequence[Upload]) -> list[tuple[str, str]]:
    """The uploaded files as (display name, sha256), in a fixed order whatever order they came in."""
    return sorted((display_name(u.name), u.blob.sha256) for u in uploads)


def _content_key(uploads: Sequence[Upload]) -> str:
    if len(uploads) == 1:
        return uploads[0].blob.sha256
    return hashlib.sha256(json.dumps(named_blobs(uploads)).encode()).hexdigest()


def discard_unreferenced(core: Core, shas: Sequence[str]) -> None:
    """Delete the blobs that no catalogue row references and no upload in flight has pinned."""
    for sha in sorted(set(shas)):
        core.blobs.delete_unless(sha, partial(core.queries.blob_referenced, sha))


def release_blobs(core: Core, blobs: Sequence[Blob]) -> None:
    """An upload is done with its blobs (registered or refused): unpin them, delete the unused."""
    for blob in blobs:
        core.blobs.unpin(blob)
    discard_unreferenced(core, [b.sha256 for b in blobs])


def ingest(
    core: Core,
    uploads: Sequence[Upload],
    name: str | None = None,
    origin: str = "upload",
    provenance: dict[str, Any] | None = None,
    idempotency: tuple[str, str] | None = None,
) -> Checkpoint:
    """Register uploaded blobs as a checkpoint. On any refusal the blobs that nothing else uses are
    removed, so a failed upload leaves no file and no catalogue row behind. Either way the
    upload's pins on its blobs are released. ``idempotency``: (Idempotency-Key, request
    fingerprint) to record with it (``ckptscope.services.idempotency``)."""
    try:
        if not uploads:
            raise Invalid("no file was uploaded (send the checkpoint in the multipart field 'file')")
        chosen = arrange_upload(uploads)  # several files: a folder's rules say which, and the primary
        primary, files = chosen.primary, chosen.files
        by_name = {display_name(u.name): u.blob.path for u in files}
        if len(by_name) != len(files):
            raise Invalid("two uploaded files have the same name")
        # shard names resolve only among the files of this upload, never next to the blob (that
        # directory holds other uploads' blobs)
        with core.parse_slots:
            try:
                listing = open_checkpoint_sandboxed(
                    primary.blob.path,
                    shards=by_name,
                    name=display_name(primary.name),
                    limits=core.parse_limits,
                    folder=chosen.folder,
                )
            except CheckpointError as exc:
                core.metrics.inc("ckptscope_parse_failures_total", code=exc.code)
                raise
        listing.warnings += chosen.notes
        make_storable(listing)  # text any database can hold (bad_name); the CLI applies the same rule
        used = {str(p) for p in listing.files}
        # a folder's config.json, tokenizer files, README: ignored (the listing says so), not stored
        files = [u for u in files if str(u.blob.path) in used or u.name not in chosen.ignorable]
        unused = [display_name(u.name) for u in files if str(u.blob.path) not in used]
        if unused:
            listed = ", ".join(sorted(unused))[:300]
            raise Invalid(f"uploaded files not part of the checkpoint (no index names them): {listed}", "unlisted_file")
        row, content = core.queries.register(
            _content_key(files),
            listing,
            [StoredFile(display_name(u.name), u.blob.sha256, u.blob.size) for u in files],
            {str(u.blob.path): u.blob.sha256 for u in files},
            name=checkpoint_label(name) if name else display_name(chosen.name or primary.name),
            origin=origin,
            provenance=provenance,
            idempotency=idempotency,
        )
    finally:
        release_blobs(core, [u.blob for u in uploads])
    if content.stats_state in (StatsState.PENDING, StatsState.FAILED):
        core.jobs.submit_stats(content.key)
    if origin == "upload":
        core.metrics.inc("ckptscope_uploads_total")
        core.metrics.inc("ckptscope_upload_bytes_total", row.size_bytes)
    return row


def get_checkpoint(core: Core, checkpoint_id: str) -> tuple[Checkpoint, Content]:
    """A checkpoint and its content; a referenced one as its source is now (``references``)."""
    from .references import refresh_reference  # references registers through this module

    row, content = core.queries.get_checkpoint(checkpoint_id)
    return refresh_reference(core, row, content)


def list_checkpoints(core: Core) -> list[tuple[Checkpoint, Content]]:
    return core.queries.list_checkpoints()


def checkpoint_page(core: Core, *, offset: int, limit: int) -> tuple[int, list[tuple[Checkpoint, Content]]]:
    """All checkpoints counted, and ``limit`` of them from ``offset``, newest first."""
    return core.queries.checkpoint_page(offset=offset, limit=limit)


def files_of(core: Core, content_key: str) -> list[FileRef]:
    return core.queries.files_of(content_key)


def rename_checkpoint(core: Core, checkpoint_id: str, name: str) -> tuple[Checkpoint, Content]:
    """Relabel a checkpoint (``checkpoint_label`` rules); its id, content and files stay."""
    core.queries.rename_checkpoint(checkpoint_id, checkpoint_label(name))
    return core.queries.get_checkpoint(checkpoint_id)


def forget_content(core: Core, content_key: str) -> None:
    """A content lost its last checkpoint: this process's job stops (others notice the content is
    gone) and its cached spectra go."""
    from .previews import forget_spectra  # previews reads tensors through this module

    core.jobs.cancel(content_key)
    forget_spectra(core, content_key)


def delete_checkpoint(core: Core, checkpoint_id: str) -> None:
    discard_unreferenced(core, core.queries.delete_checkpoint(checkpoint_id, partial(forget_content, core)))


# --- reading tensors -------------------------------------------------------------------------


def tensor_page(core: Core, content: Content, root: str, **query: Any) -> TensorPage:
    return core.queries.tensor_page(content, root, **query)


def tensor_detail(core: Core, content: Content, root: str, name: str) -> tuple[TensorInfo, TensorStats | None]:
    return core.queries.tensor_detail(content, root, name)


def all_tensors(core: Core, content: Content, root: str = "") -> list[tuple[TensorInfo, TensorStats | None]]:
    return core.queries.all_tensors(content, root)


_tree_flights: SingleFlight[TreeNode] = SingleFlight()


class _NotBuilt(Exception):
    pass


def _not_built() -> TreeNode:
    raise _NotBuilt


def module_tree(core: Core, content: Content, root: str) -> TreeNode:
    """The module tree of a root, built once per (content, root, stats state): requests that ask
    while it is being built wait for that build."""
    key = (content.key, root, content.stats_state)

    def build() -> TreeNode:
        tensors, nonfinite = core.queries.tree_inputs(content, root)
        return build_tree(tensors, nonfinite, module_types_under(content.module_types or {}, root))

    return _tree_flights.run((core.trees, key), lambda: core.trees.get(key, build))


def built_module_tree(core: Core, content: Content, root: str) -> TreeNode | None:
    """``module_tree`` if it is built already, else None (nothing is built)."""
    try:
        return core.trees.get((content.key, root, content.stats_state), _not_built)
    except _NotBuilt:
        return None


_SHORT_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def params_by_dtype(tree: TreeNode) -> list[tuple[str, int]]:
    """Parameter counts per dtype, largest first, tied tensors once, with the Hugging Face Hub's
    short names (``F32``, ``BF16``; a GGUF type such as ``Q4_K`` as it is)."""
    counts: dict[str, int] = {}
    for dtype, numel in tree.param_dtypes.items():
        short = _SHORT_DTYPES.get(dtype, dtype.upper())
        counts[short] = counts.get(short, 0) + numel
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def module_node(core: Core, content: Content, root: str, path: str) -> TreeNode:
    node = module_tree(core, content, root).find(path)
    if node is None:
        raise NotFound(f"no module {path!r} in this checkpoint")
    return node


def progress(core: Core, content: Content) -> dict[str, Any] | None:
    """Where the stats of a content stand, for a progress bar; None when they are done."""
    if content.stats_state == StatsState.DONE:
        return None
    job_id = core.queries.jobs_for([content.key]).get(content.key)
    job = None
    if job_id:
        try:
            job = core.queries.get_job(job_id)
        except NotFound:  # a claim lost to another process deletes the job that did not run
            job = None
    return {
        "state": content.stats_state,
        "error": content.stats_error,
        "done": job.done if job else 0,
        "total": job.total if job else 0,
    }
