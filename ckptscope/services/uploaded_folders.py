"""Several uploaded files, or a folder sent from the browser (each file with its relative path as
its multipart file name): which of them make the checkpoint, and which one it is opened from.

The rules are the folder reader's (``formats/folder.py``, ``plan_folder``): a sharded index before
a single weights file, safetensors before ``.bin``; ``.metadata`` for torch.distributed.checkpoint;
a Trainer ``checkpoint-N/`` folder's files all read as roots. Client names are text, never paths:
each part of a relative name is cleaned like a display name; the folder's own name (the common
first part) becomes the checkpoint's name; files in sub-folders and hidden files (``.DS_Store``)
are set aside, as are the plan's non-checkpoint files (``config.json``, tokenizer files): those are
never stored, and the listing says so.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ckptscope.errors import CheckpointError
from ckptscope.formats import is_dcp_metadata, sniff
from ckptscope.formats.folder import DCP_METADATA, is_weight_name, plan_folder

if TYPE_CHECKING:
    from .checkpoints import Upload

MAX_PART = 255


@dataclass(slots=True)
class UploadSet:
    files: list[Upload]  # handed to the reader, each named by its plain file name in the folder
    primary: Upload  # the file the checkpoint is opened from
    folder: bool  # read as a folder (several files)
    name: str | None = None  # the folder's own name, when the client sent relative paths
    ignorable: set[str] = field(default_factory=set)  # names of files that may stay unread: not stored
    notes: list[str] = field(default_factory=list)  # what was set aside before reading


def _clean(part: str) -> str:
    return "".join(ch for ch in part if unicodedata.category(ch)[0] != "C").strip()[:MAX_PART]


def relative_parts(raw: str | None) -> list[str]:
    """A client's (relative) file name as safe parts: no empty, ``.`` or ``..`` part, no control
    characters."""
    parts = [_clean(p) for p in (raw or "").replace("\\", "/").split("/")]
    return [p for p in parts if p and p not in (".", "..")]


def arrange_upload(uploads: Sequence[Upload]) -> UploadSet:
    """Decide which uploaded files make the checkpoint. One file is opened as it is."""
    if len(uploads) == 1:
        return UploadSet([uploads[0]], uploads[0], folder=False)
    named = [(relative_parts(u.name) or ["upload"], u) for u in uploads]
    folder_name = None
    firsts = {parts[0] for parts, _ in named}
    if len(firsts) == 1 and all(len(parts) > 1 for parts, _ in named):
        folder_name = firsts.pop()
        named = [(parts[1:], u) for parts, u in named]
    files: list[Upload] = []
    nested: list[str] = []
    for parts, upload in named:
        if any(p.startswith(".") for p in parts[:-1]) or (parts[-1].startswith(".") and parts[-1] != DCP_METADATA):
            continue  # hidden: .DS_Store, ._x, .git/...: set aside silently
        if len(parts) > 1:
            nested.append("/".join(parts))
        else:
            files.append(replace(upload, name=parts[0]))
    notes = [f"ignored (in a sub-folder): {', '.join(sorted(nested)[:12])}"] if nested else []
    try:
        plan = plan_folder([u.name for u in files], subdirs=sorted({n.split("/", 1)[0] for n in nested}))
    except CheckpointError:
        index = _index_by_content(files)
        if index is None:
            raise
        return UploadSet(files, index, folder=False, name=folder_name, notes=notes)
    by_name = {u.name: u for u in files}
    primary = by_name[plan.primary or plan.reads[0]]
    return UploadSet(files, primary, folder=True, name=folder_name, ignorable=set(plan.ignored), notes=notes)


def _index_by_content(files: Sequence[Upload]) -> Upload | None:
    """A sharded index sent under another name than ``*.index.json`` beside its shards (the one
    JSON file among weights files), or a DCP ``.metadata`` renamed (the one DCP metadata pickle)."""
    if not any(is_weight_name(u.name) for u in files):
        return None
    indexes = [u for u in files if sniff(u.blob.path) == "json"]
    if not indexes:  # a torch.distributed.checkpoint .metadata saved under another name
        indexes = [u for u in files if sniff(u.blob.path) == "pickle" and is_dcp_metadata(u.blob.path)]
    return indexes[0] if len(indexes) == 1 else None
