"""The operations on catalogue entries: export, copy, freeze plan, diff, download."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope.errors import Invalid, NotFound, UnsupportedOutput
from ckptscope.formats import TensorInfo
from ckptscope.formats.sandbox import open_checkpoint_sandboxed
from ckptscope.formats.writers import OutputTensor
from ckptscope.text import make_storable

from . import checkpoints as svc
from .checkpoints import Upload
from .identity import verify_written
from .local_bytes import local_outputs, local_tensors
from .operations import (
    CopyReport,
    FreezePlan,
    copy_metadata,
    copy_report,
    dequantized,
    diff_tensors,
    export_metadata,
    export_with_plan,
    freeze_plan,
    output_format_for,
    write_checkpoint,
)

if TYPE_CHECKING:
    from ckptscope.core import Core
    from ckptscope.stats import TensorStats
    from ckptscope.store.catalogue import Checkpoint

EXTENSIONS = {"safetensors": ".safetensors", "pt": ".pt"}


def _tensors(core: Core, checkpoint_id: str, root: str | None) -> tuple[Checkpoint, Any, str, list[TensorInfo]]:
    row, content, root, pairs = _tensors_and_stats(core, checkpoint_id, root)
    return row, content, root, [t for t, _ in pairs]


def _tensors_and_stats(
    core: Core, checkpoint_id: str, root: str | None
) -> tuple[Checkpoint, Any, str, list[tuple[TensorInfo, TensorStats | None]]]:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    return row, content, root, svc.all_tensors(core, content, root)


def _digests(pairs: Sequence[tuple[TensorInfo, TensorStats | None]]) -> dict[str, str | None]:
    """Tensor name -> its digest from the stats (None where they are not computed yet)."""
    return {t.name: s.digest if s is not None else None for t, s in pairs}


def _stem(name: str) -> str:
    for ext in (".index.json", ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _write_and_register(
    core: Core,
    outputs: Sequence[OutputTensor],
    fmt: str,
    metadata: dict[str, str],
    name: str,
    origin: str,
    provenance: dict[str, Any],
    check: Callable[[Path], None] | None = None,
) -> Checkpoint:
    """``check(path)``: runs on the written file before it is kept (raising keeps nothing)."""
    temp = core.blobs.temp_path(EXTENSIONS[fmt])
    try:
        write_checkpoint(temp, outputs, fmt, metadata)
        if check is not None:
            check(temp)
        blob = core.blobs.adopt(temp)
    finally:
        temp.unlink(missing_ok=True)
    return svc.ingest(core, [Upload(name, blob)], origin=origin, provenance=provenance)


def export(
    core: Core,
    checkpoint_id: str,
    *,
    root: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    fmt: str = "safetensors",
    freeze: Sequence[str] = (),
    dtype: str | None = None,
) -> tuple[Checkpoint, FreezePlan | None]:
    """``dtype``: store floating-point tensors in it (encoded GGUF tensors are dequantized to it, to
    float32 without one); the provenance's ``dequantized`` says what was decoded."""
    if fmt not in EXTENSIONS:
        raise UnsupportedOutput(f"unknown format {fmt!r}; choose safetensors or pt")
    row, content, root, tensors = _tensors(core, checkpoint_id, root)
    outputs, plan = export_with_plan(tensors, include, exclude, rename, freeze, dtype)
    selection = {"root": root, "include": list(include), "exclude": list(exclude), "rename": dict(rename or {})}
    if dtype is not None:
        selection["dtype"] = dtype
    decoded = dequantized(outputs)
    metadata = export_metadata(row.name, content.key, selection, plan, content.meta, fmt, decoded)
    provenance = {
        "operation": "export",
        "source": {"id": row.id, "name": row.name, "sha256": content.key},
        "selection": selection,
        "format": fmt,
        "freeze": list(freeze),
        "dequantized": decoded,
    }
    with local_outputs(core, [content.key], outputs) as readable:  # a bucket's bytes copied for the write
        new = _write_and_register(
            core, readable, fmt, metadata, f"{_stem(row.name)}.export{EXTENSIONS[fmt]}", "export", provenance
        )
    return new, plan


def copy(
    core: Core,
    source_id: str,
    target_id: str,
    mapping: Mapping[str, str],
    *,
    strict: bool = True,
    dry_run: bool = False,
    source_root: str | None = None,
    target_root: str | None = None,
) -> tuple[CopyReport, Checkpoint | None]:
    src_row, src_content, src_root, src_pairs = _tensors_and_stats(core, source_id, source_root)
    src = [t for t, _ in src_pairs]
    dst_row, dst_content, dst_root, dst = _tensors(core, target_id, target_root)
    report = copy_report(src, dst, mapping, strict)
    if dry_run or (strict and not report.ok) or not report.copied:
        return report, None
    fmt = output_format_for(dst_content.format)
    provenance = {
        "operation": "copy",
        "source": {"id": src_row.id, "name": src_row.name, "sha256": src_content.key, "root": src_root},
        "target": {"id": dst_row.id, "name": dst_row.name, "sha256": dst_content.key, "root": dst_root},
        "mapping": report.mapping,
        "strict": strict,
        "copied": len(report.copied),
    }
    metadata = copy_metadata(dst_content.meta, fmt, {k: v for k, v in provenance.items() if k != "copied"})

    def check(path: Path) -> None:  # read the written copy back (sandboxed): bit-exact, or nothing is kept
        with core.parse_slots:
            written = open_checkpoint_sandboxed(path, limits=core.parse_limits)
        make_storable(written)  # names as the catalogue and the report spell them
        verified = verify_written(written, report, src, metadata, source_digests=_digests(src_pairs)).to_json()
        provenance["verified"] = {"counts": verified["counts"], "modules": verified["modules"][:100]}

    name = f"{_stem(dst_row.name)}.copy{EXTENSIONS[fmt]}"
    with local_outputs(core, [src_content.key, dst_content.key], report.outputs) as readable:
        new = _write_and_register(core, readable, fmt, metadata, name, "copy", provenance, check)
    return report, new


def freeze(core: Core, checkpoint_id: str, prefixes: Sequence[str], root: str | None = None) -> FreezePlan:
    _, _, _, tensors = _tensors(core, checkpoint_id, root)
    return freeze_plan(tensors, prefixes)


def diff(core: Core, a_id: str, b_id: str, a_root: str | None = None, b_root: str | None = None) -> dict[str, Any]:
    a_row, a_content, a_root, a = _tensors_and_stats(core, a_id, a_root)
    b_row, b_content, b_root, b = _tensors_and_stats(core, b_id, b_root)
    # tensors with equal digests are identical without reading them; the others are read (a
    # bucket's bytes copied for the comparison)
    da, db = _digests(a), _digests(b)
    same = {n for n, d in da.items() if d is not None and db.get(n) == d}
    with (
        local_tensors(core, [a_content.key], [t for t, _ in a if t.name not in same]) as read_a,
        local_tensors(core, [b_content.key], [t for t, _ in b if t.name not in same]) as read_b,
    ):
        local_a = {t.name: t for t in read_a}
        local_b = {t.name: t for t in read_b}
        result = diff_tensors([local_a.get(t.name, t) for t, _ in a], [local_b.get(t.name, t) for t, _ in b], da, db)
    result["a"] = {"id": a_row.id, "name": a_row.name, "root": a_root, "sha256": a_content.key}
    result["b"] = {"id": b_row.id, "name": b_row.name, "root": b_root, "sha256": b_content.key}
    return result


def download(core: Core, checkpoint_id: str, file: str | None = None) -> tuple[Path, str]:
    row, content = svc.get_checkpoint(core, checkpoint_id)
    files = svc.files_of(core, content.key)
    if file is None:
        if len(files) != 1:
            names = ", ".join(f.name for f in files)
            raise Invalid(f"this checkpoint has {len(files)} files; choose one with ?file= ({names})")
        chosen = files[0]
        # the label when it is a file name of the same kind (an upload's own), else the file's name
        same_kind = Path(row.name).suffix and Path(row.name).suffix == Path(chosen.name).suffix
        name = row.name if same_kind else chosen.name
    else:
        match = [f for f in files if f.name == file]
        if not match:
            raise NotFound(f"no file {file!r} in this checkpoint")
        chosen, name = match[0], match[0].name
    where = core.queries.location(chosen.sha256)  # a blob, a referenced local file, or an object's URL
    if "://" in where:
        raise Invalid(f"{chosen.name} lives in an object store ({where}); fetch it from there", "remote_source")
    return Path(where), name
