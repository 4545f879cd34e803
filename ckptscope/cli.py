"""The ``ckptscope`` command line. Exit statuses: ``cli_exits``; where output goes: ``cli_output``."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope import __version__
from ckptscope.cli_exits import (
    CLOSED_PIPE,
    EPILOG,
    FAILED,
    INTERRUPTED,
    OK,
    USAGE,
    UnreadableInput,
    failure_of,
    is_closed_pipe,
    os_reason,
    silence_stdout,
    stdout_closed,
)
from ckptscope.cli_output import say, stats_progress, stdout_console, whole_writes_stdout, write_atomically, write_json
from ckptscope.errors import CkptscopeError, Invalid
from ckptscope.text import make_storable, reveal, storable_text
from ckptscope.units import human_bytes

if TYPE_CHECKING:  # the module's own imports stay few and light: ``--help`` is argparse and nothing else
    import logging
    import typing
    from collections.abc import Iterator

    from ckptscope.formats import Checkpoint
    from ckptscope.insights.findings import Thresholds


_say = say  # every line the CLI prints goes through ``say``: attacker text never reaches the terminal raw


def _rich(value: object) -> str:
    """Attacker text for a rich table or tree: escaped for the terminal, then for rich markup."""
    from rich.markup import escape

    return escape(reveal(str(value)))


_READERS: dict[int, Any] = {}  # id(listing) -> the RangeReader of a listing opened from an object store


def _open(path: str) -> Checkpoint:
    """List one input file exactly as the server does: parsed in a fresh sandboxed child process
    (the CKPTSCOPE_PARSE_* limits: memory, CPU time, wall clock), so a hostile file can hang,
    crash or exhaust only that child, never this process or the next file; then the text rule of
    the catalogue (``make_storable``). Statistics are computed here, on the validated listing.
    ``s3://bucket/key`` is listed where it lives, by its header ranges (AWS environment
    credentials); ``file:///path`` is the local path."""
    from ckptscope.config import command_settings
    from ckptscope.formats.sandbox import open_checkpoint_sandboxed

    try:
        if path.startswith("s3://"):
            from ckptscope.services.references import open_remote

            listing, reader = open_remote(path, command_settings().parse_limits)
            _READERS[id(listing)] = reader
            return listing
        local = _local_path(path)
        # absolute: the child runs in another directory; shards=None: shards beside a local index
        limits = command_settings().parse_limits
        listing = open_checkpoint_sandboxed(os.path.abspath(local), limits=limits, shards=None)
        make_storable(listing)
    except CkptscopeError as exc:
        raise UnreadableInput(path, exc) from None
    return listing


def _local_path(path: str) -> str:
    if not path.startswith("file:"):
        return path
    from ckptscope.store.sources import parse_source_url

    return parse_source_url(path).key


def _reader(listing: Checkpoint) -> Any:
    """The RangeReader of a listing opened from an object store; None for local files."""
    return _READERS.get(id(listing))


@contextlib.contextmanager
def _readable(listing: Checkpoint, tensors: list[Any]) -> Iterator[list[Any]]:
    """``tensors`` of ``listing`` readable as local files inside the block: a bucket's storages
    copied once to a temp file (deleted afterwards); local files as they are."""
    reader = _reader(listing)
    if reader is None:
        yield tensors
        return
    from ckptscope.stats.localized import localized

    with localized(tensors, reader) as local:
        yield local


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_inspection(data: dict[str, Any]) -> None:
    import json

    from rich.table import Table
    from rich.tree import Tree

    from ckptscope.stats.model import STATISTICS

    console = stdout_console()
    console.print(
        f"[bold]{_rich(data['format'])}[/bold]: {data['tensor_count']} tensors, "
        f"{human_bytes(data['total_bytes'])}, root {_rich(repr(data['root']))}"
    )
    if len(data["roots"]) > 1:
        roots = ", ".join(f"{_rich(repr(r['path']))} ({r['tensor_count']})" for r in data["roots"])
        console.print(f"roots: {roots}")
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {_rich(warning)}")
    if data["metadata"]:
        meta = Table("key", "value", title="metadata", show_lines=False)
        for key, value in list(data["metadata"].items())[:50]:
            meta.add_row(_rich(key), _rich(json.dumps(value, ensure_ascii=False)[:120]))
        console.print(meta)

    def add(branch: Tree, node: dict[str, Any]) -> None:
        for child in node.get("children", []):
            label = (
                f"{_rich(child['name'])}  [dim]{child['tensor_count']} tensors, {human_bytes(child['nbytes'])}[/dim]"
            )
            if child.get("module_type"):
                label += f" [cyan]{_rich(child['module_type'])}[/cyan]"
            if child["nan"] or child["inf"]:
                label += f" [red]NaN {child['nan']} Inf {child['inf']}[/red]"
            add(branch.add(label), child)

    tree = Tree("[bold]modules[/bold]")
    add(tree, data["tree"])
    console.print(tree)
    columns = [s.name for s in STATISTICS]
    table = Table("name", "kind", "dtype", "shape", *columns)
    for t in data["tensors"]:
        s = t.get("stats") or {}
        guessed = "?" if t["kind_source"] != "file" and t["kind"] == "buffer" else ""  # a buffer by its name only
        kind = t["kind"] + guessed + (f" = {t['alias_of']}" if t["alias_of"] else "")
        name = t["name"] + (f"  ({t['name'].rpartition('.')[2]} of {t['parameter']})" if t.get("parameter") else "")
        table.add_row(_rich(name), _rich(kind), t["dtype"], str(t["shape"]), *(_fmt(s.get(k)) for k in columns))
    console.print(table)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ckptscope.services.inspect import inspect_listing

    listing = _open(args.path)
    listing.resolve_root(args.root)  # an unknown root ends here, before any stats are computed
    with stats_progress(not args.no_stats) as progress:
        result = inspect_listing(
            listing,
            root=args.root,
            with_stats=not args.no_stats,
            progress=progress,
            device=args.device,
            thresholds=_thresholds(),
            reader=_reader(listing),
            dask=_dask_scheduler(args.dask),
        )
    data = result.to_json()
    if args.json:
        write_json(data)
    else:
        _print_inspection(data)
    return OK


def _scheduler_argument(value: str) -> str:
    """``--dask``: validated as CKPTSCOPE_DASK_SCHEDULER is (argparse's one line and exit 2)."""
    from ckptscope.config import valid_scheduler

    try:
        return valid_scheduler(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dask_scheduler(given: str | None) -> str | None:
    """``--dask``, else CKPTSCOPE_DASK_SCHEDULER; None for this process's threads."""
    from ckptscope.config import command_settings

    return given or command_settings().dask_scheduler or None


def _thresholds() -> Thresholds:
    """The findings' thresholds (CKPTSCOPE_FINDINGS_THRESHOLDS, else the defaults)."""
    from ckptscope.config import command_settings

    return command_settings().findings_threshold_values


def _cmd_findings(args: argparse.Namespace) -> int:
    from ckptscope.services.inspect import inspect_listing

    listing = _open(args.path)
    root = listing.resolve_root(args.root)
    with stats_progress() as progress:
        inspection = inspect_listing(
            listing,
            root=root,
            device=args.device,
            thresholds=_thresholds(),
            progress=progress,
            reader=_reader(listing),
        )
    insights = inspection.insights()
    status = FAILED if insights.findings else OK  # like a linter: 1 when there is something to look at
    if args.json:
        write_json({"root": root, **insights.to_json()})
        return status
    for f in insights.findings:
        _say(f"{f.severity:<7}  {f.rule:<23}  {f.target}: {f.message}")
    counts = insights.modules[""].findings if "" in insights.modules else {}
    summary = ", ".join(f"{n} {sev}" for sev, n in reversed(counts.items()) if n)  # errors first
    _say(f"{len(insights.findings)} findings" + (f" ({summary})" if summary else ""), err=True)
    return status


def _pairs(values: list[str]) -> dict[str, str]:
    from ckptscope.services.selection import parse_pairs

    return parse_pairs(values)


def _sha256(path: str, listing: Checkpoint | None = None) -> str:
    """A file's sha256; for a folder, the digest of its files' names and hashes (the rule of a
    multi-file upload's content key), over the files the listing was read from."""
    import hashlib
    import json

    if listing is not None and _reader(listing) is not None:  # an object store's: its listed identities
        objects = sorted([url, ref_identity[1].to_json()] for url, ref_identity in _reader(listing).objects.items())
        return hashlib.sha256(json.dumps([path, objects]).encode()).hexdigest()
    if listing is not None and os.path.isdir(path):
        parts = sorted((Path(f).name, _sha256(f)) for f in listing.files)
        return parts[0][1] if len(parts) == 1 else hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise UnreadableInput(path, f"cannot read the file: {os_reason(exc)}") from None
    return digest.hexdigest()


def _file_name(path: str) -> str:
    """An input's file name as recorded in an output's metadata (as text any writer can store)."""
    return str(storable_text(Path(path).name))


def _format_for_output(path: str, requested: str | None) -> str:
    if requested:
        return requested
    return "safetensors" if path.endswith(".safetensors") else "pt"


def _cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from ckptscope.services.operations import (
        dequantized,
        dequantized_text,
        export_metadata,
        export_with_plan,
        write_checkpoint,
    )

    ckpt = _open(args.path)
    root = ckpt.resolve_root(args.root)
    rename = _pairs(args.rename)
    tensors = ckpt.root_tensors(root)
    outputs, plan = export_with_plan(tensors, args.include, args.exclude, rename, args.freeze, args.dtype)
    fmt = _format_for_output(args.output, args.format)
    selection: dict[str, Any] = {"root": root, "include": args.include, "exclude": args.exclude, "rename": rename}
    if args.dtype:
        selection["dtype"] = args.dtype
    decoded = dequantized(outputs)
    source_sha = _sha256(args.path, ckpt)
    meta_ = export_metadata(_file_name(args.path), source_sha, selection, plan, ckpt.metadata, fmt, decoded)
    with _readable(ckpt, [o.source for o in outputs]) as sources:
        readable = [dataclasses.replace(o, source=s) for o, s in zip(outputs, sources, strict=True)]
        write_atomically(args.output, lambda p: write_checkpoint(p, readable, fmt, meta_))
    if args.json:
        written = {"output": args.output, "format": fmt, "tensors": len(outputs)}
        write_json(written | {"bytes": Path(args.output).stat().st_size, "dequantized": decoded})
        return 0
    _say(f"wrote {len(outputs)} tensors to {args.output} ({fmt})")
    if decoded:
        _say(dequantized_text(decoded))
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    import dataclasses

    from ckptscope.services.identity import CopyNotVerified, verify_written
    from ckptscope.services.operations import copy_metadata, copy_report, output_format_for, write_checkpoint

    src = _open(args.source)
    dst = _open(args.target)
    source_root, target_root = src.resolve_root(args.source_root), dst.resolve_root(args.target_root)
    strict = not args.no_strict
    source_tensors = src.root_tensors(source_root)
    report = copy_report(source_tensors, dst.root_tensors(target_root), _pairs(args.map), strict)
    written = False
    unverified: CopyNotVerified | None = None
    if not args.dry_run and (report.ok or not strict) and report.copied:
        if not args.output:
            raise Invalid("copy needs -o OUTPUT (or --dry-run)")
        fmt = output_format_for(dst.format)
        provenance = {
            "operation": "copy",
            "source": {"name": _file_name(args.source), "sha256": _sha256(args.source, src), "root": source_root},
            "target": {"name": _file_name(args.target), "sha256": _sha256(args.target, dst), "root": target_root},
            "mapping": report.mapping,
            "strict": strict,
        }
        meta = copy_metadata(dst.metadata, fmt, provenance)

        needed = [o.source for o in report.outputs]
        try:
            with _readable(src, source_tensors) as local_src, _readable(dst, needed) as local_needed:
                by_view = {t.view_key: local for t, local in zip(source_tensors, local_src, strict=True)}
                readable = [
                    dataclasses.replace(o, source=by_view.get(o.source.view_key, n))
                    for o, n in zip(report.outputs, local_needed, strict=True)
                ]

                def write_and_verify(path: Path) -> None:  # read back before it replaces the output
                    write_checkpoint(path, readable, fmt, meta)
                    verify_written(_open(str(path)), report, local_src, meta)

                write_atomically(args.output, write_and_verify)
            written = True
        except CopyNotVerified as exc:
            unverified = exc
    data = report.to_json()
    if args.json:
        write_json({"written": written, "report": data})
    else:
        counts = data["counts"]
        _say(
            f"copied {counts['copied']}, missing {counts['missing']}, unexpected {counts['unexpected']}, "
            f"shape mismatches {counts['shape_mismatches']}, dtype changes {counts['dtype_changes']}, "
            f"tied aliases updated {counts['aliases_updated']}, tied conflicts {counts['tied_conflicts']}"
        )
        for key in ("missing", "unexpected", "shape_mismatches", "dtype_changes"):
            for item in data[key][:20]:
                _say(f"  {key}: {item}")
        for alias in data["aliases_updated"][:20]:
            _say(f"  alias updated: {alias['name']} (tied to {alias['via']}, from {alias['source']})")
        for conflict in data["tied_conflicts"][:20]:
            names = " and ".join(f"{c['source']} -> {c['target']}" for c in conflict["sources"])
            _say(f"  tied conflict: {names} fill one storage; {conflict['winner']['target']} wins")
        if data["verified"] is not None:
            _say_verified(data["verified"])
        _say(f"wrote {args.output}" if written else "nothing written")
    if unverified is not None:
        _say(f"ckptscope: {unverified}", err=True)
        return 1
    if not args.dry_run and not report.ok and strict:
        _say("ckptscope: strict copy refused (use --no-strict to copy what fits)", err=True)
        return 1
    return 0


def _say_verified(verified: dict[str, Any]) -> None:
    counts = verified["counts"]
    if verified["ok"]:
        _say(f"verified bit-exact: {counts['identical']} copied tensors read back identical to their sources")
    else:
        _say(f"VERIFICATION FAILED: {counts['mismatched']} written tensors differ from their sources")
        for m in verified["mismatched"][:20]:
            _say(f"  mismatch: {m['target']} (from {m['source']}): expected {m['expected']}, written {m['written']}")
    for m in verified["modules"][:20]:
        source, target = m["source"] or "(whole root)", m["target"] or "(whole root)"
        how = "identical to" if m["identical"] else "not identical to"
        _say(f"  module: target {target} is now {how} source {source}")


def _cmd_freeze(args: argparse.Namespace) -> int:
    from ckptscope.services.operations import freeze_plan

    ckpt = _open(args.path)
    plan = freeze_plan(ckpt.root_tensors(args.root), args.freeze)
    if args.snippet:
        for line in plan.snippet().splitlines():  # Python source: names in it are repr()s
            _say(line)
    elif args.json:
        write_json(plan.to_json())
    else:
        _say(
            f"frozen: {len(plan.frozen)} tensors, {plan.frozen_params:,} values; "
            f"trainable: {len(plan.trainable)} tensors, {plan.trainable_params:,} values "
            f"({plan.trainable_fraction:.1%}); buffers (not parameters): {len(plan.buffers)}"
        )
        for prefix in plan.unmatched_prefixes:
            _say(f"warning: {prefix!r} matches no tensor", err=True)
        if plan.guessed_kinds:
            _say(
                f"note: {len(plan.guessed_kinds)} tensors are labelled parameter or buffer from their names "
                "(the file does not say); check the buffers against the model",
                err=True,
            )
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from ckptscope.services.operations import diff_tensors

    a = _open(args.a)
    b = _open(args.b)
    with _readable(a, a.root_tensors(args.a_root)) as ta, _readable(b, b.root_tensors(args.b_root)) as tb:
        result = diff_tensors(ta, tb)
    status = FAILED if _differ(result) else OK  # like diff(1): 1 when A and B differ
    if args.json:
        write_json(result)
        return status
    _say(", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    identical = result["identical_modules"]
    if identical:
        shown = ", ".join(m or "(whole checkpoint)" for m in identical[:20])
        _say(f"identical modules ({len(identical)}): {shown}{' ...' if len(identical) > 20 else ''}")
    for moved in result["moved_modules"][:20]:
        _say(f"identical module moved: {moved['a']} (A) = {moved['b']} (B)")
    for row in result["tensors"]:
        if row["status"] != "identical":
            extra = ""
            if row.get("max_abs_diff") is not None:
                extra = (
                    f" max|a-b| {row['max_abs_diff']:.4g} rel-L2 {_fmt(row.get('rel_l2'))}"
                    f" cos {_fmt(row.get('cosine'))}"
                )
            _say(f"{row['status']:>14}  {row['name']}{extra}")
    return status


def _differ(result: dict[str, Any]) -> bool:
    """Any tensor only in A or only in B, with another shape or dtype, or with other values."""
    return any(row["status"] != "identical" or row.get("dtype_a") != row.get("dtype_b") for row in result["tensors"])


def _rules_from_file(path: str) -> list[str]:
    from ckptscope.insights.rules import rules_file_lines

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnreadableInput(path, f"cannot read the rules file: {reason}") from None
    return rules_file_lines(text)


def _check_tensors(path: str, root: str | None, device: str | None) -> tuple[Any, str, list[Any]]:
    from ckptscope.services.inspect import inspect_listing

    listing = _open(path)
    root = listing.resolve_root(root)
    with stats_progress() as progress:
        result = inspect_listing(listing, root=root, device=device, progress=progress, reader=_reader(listing))
    stats = result.stats or {}
    return listing, root, [(t, stats.get(t.name)) for t in result.tensors]


def _cmd_check(args: argparse.Namespace) -> int:
    from ckptscope.config import Settings
    from ckptscope.formats.model import module_types_under
    from ckptscope.services.check import junit_xml, prepare, run_rules
    from ckptscope.services.insights import analyse, thresholds_of

    texts = list(args.rule) + (_rules_from_file(args.rules) if args.rules else [])
    rules = prepare(texts, has_baseline=args.baseline is not None)  # a bad rule ends here, before any reading
    listing, root, tensors = _check_tensors(args.path, args.root, args.device)
    baseline = None
    if args.baseline is not None:
        baseline = _check_tensors(args.baseline, args.baseline_root, args.device)[2]
    types = module_types_under(listing.module_types, root)
    report = run_rules(
        rules,
        tensors,
        baseline,
        insights=lambda: analyse(tensors, thresholds_of(Settings()), module_types=types),
        module_types=types,
    )
    if args.junit:
        xml = junit_xml(report)
        write_atomically(args.junit, lambda p: p.write_bytes(xml), make_parents=True)  # a CI job's reports/
    if args.json:
        write_json(report.to_json())
    else:
        for r in report.results:
            _say(f"{'PASS' if r.passed else 'FAIL'}  {r.rule}: {r.detail}")
            for name in r.offenders[:20]:
                _say(f"        {name}")
            if r.offender_count > min(len(r.offenders), 20):
                _say(f"        ... and {r.offender_count - min(len(r.offenders), 20)} more")
        failed = sum(not r.passed for r in report.results)
        _say(f"{len(report.results) - failed} passed, {failed} failed")
    return OK if report.passed else FAILED


def _listed_tensor(args: argparse.Namespace) -> Any:
    """PATH's listing and the TENSOR argument's TensorInfo in it (under --root)."""
    from ckptscope.errors import NotFound

    listing = _open(args.path)
    root = listing.resolve_root(args.root)
    for info in listing.root_tensors(root):
        if info.name == args.tensor:
            return listing, info
    raise NotFound(f"no tensor named {args.tensor!r} under root {root!r}")


def _cmd_preview(args: argparse.Namespace) -> int:
    from ckptscope.services.previews import describe, parse_index, render_preview

    listing, info = _listed_tensor(args)
    with _readable(listing, [info]) as (local,):
        image = render_preview(local, args.reduce, parse_index(args.index))
    write_atomically(args.output, lambda p: p.write_bytes(image.png))
    described = describe(image.preview.plan, image.preview.reduce)
    if args.json:
        write_json({"output": args.output, "width": image.width, "height": image.height, "preview": described})
        return 0
    _say(f"wrote {args.output} ({image.width} x {image.height}): {described}")
    return 0


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from ckptscope.config import command_settings
    from ckptscope.services.previews import spectrum_for, stats_device

    listing, info = _listed_tensor(args)
    device = stats_device(args.device if args.device is not None else command_settings().stats_device)
    with _readable(listing, [info]) as (local,):
        spectrum = spectrum_for(local, device)
    data = spectrum.to_json()
    if args.json:
        write_json({"name": info.name, **data})
        return 0
    rows, cols = spectrum.shape
    where = f"{spectrum.dtype} on {spectrum.device}"
    _say(f"{info.name}: {rows} x {cols} matrix, {spectrum.count} singular values ({where})")
    _say(f"sigma max       {spectrum.sigma_max:.6g}")
    _say(f"stable rank     {spectrum.stable_rank:.6g}")
    _say(f"effective rank  {spectrum.effective_rank:.6g}")
    shown = ", ".join(f"{v:.4g}" for v in spectrum.values[:8])
    _say(f"largest         {shown}{', ...' if spectrum.count > 8 else ''}")
    return 0


def _not_a_shutdown_cancel(record: logging.LogRecord) -> bool:
    import asyncio

    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, asyncio.CancelledError) and str(record.msg).startswith("Exception in ASGI"))


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from ckptscope import logs
    from ckptscope.config import get_settings
    from ckptscope.store.blobs import check_writable

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    check_writable(settings.data_dir)  # an OSError: one line and a non-zero exit, not a traceback
    logs.configure()
    log = logging.getLogger("ckptscope")
    if settings.stats_device:
        from ckptscope.stats.devices import resolve_device

        try:
            resolve_device(settings.stats_device)
        except RuntimeError as exc:
            _say(f"ckptscope: CKPTSCOPE_STATS_DEVICE: {exc}", err=True)
            return USAGE
    if settings.api_token:
        log.info(f"authentication on: every page and API call needs the token; serving on {host}:{port}")
    else:
        where = "loopback only" if host in ("127.0.0.1", "localhost", "::1") else "ALL INTERFACES"
        log.warning(f"no CKPTSCOPE_API_TOKEN set: no authentication, serving on {host}:{port} ({where})")
    loopback_names = {"localhost", "127.0.0.1", "::1"}
    served = settings.allowed_host_names  # None: any name
    if host not in loopback_names and served is not None and served <= loopback_names:
        allowed = settings.allowed_hosts
        log.warning(
            f"serving on {host}, but only requests for {allowed} are answered (others get 400 bad_host): "
            "set CKPTSCOPE_ALLOWED_HOSTS to the names clients use"
        )
    # uvicorn re-raises the SIGTERM/SIGINT it shut down on once it has: handled here, the shutdown
    # it already did ends as exit status 0 (`docker stop`), not a death by signal
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    # a request still running when the shutdown grace ends is cancelled (an upload's partial file
    # removed as it unwinds); uvicorn says so in one line, then logs a traceback per request: dropped
    logging.getLogger("uvicorn.error").addFilter(_not_a_shutdown_cancel)
    uvicorn.run(
        "ckptscope.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        log_config=logs.UVICORN_LOG_CONFIG,  # uvicorn's own lines in our JSON
        access_log=False,  # ckptscope.access logs each request (with its id)
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ckptscope.config import get_settings
    from ckptscope.store.catalogue import make_engine
    from ckptscope.store.migrate import upgrade

    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        revision, where = upgrade(engine), engine.url.render_as_string(hide_password=True)
        if args.json:
            write_json({"revision": revision, "catalogue": where})
        else:
            _say(f"catalogue schema at revision {revision} ({where})")
    finally:
        engine.dispose()
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return OK


# shtab's file completion, per shell (``shtab.FILE``, spelled here so building the parser imports nothing)
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error line: usage, then ``ckptscope: COMMAND: message``, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("ckptscope").strip()
        self.exit(USAGE, reveal(f"ckptscope: {command + ': ' if command else ''}{message}") + "\n")


def _path(p: argparse.ArgumentParser, name: str, help: str) -> None:
    setattr(p.add_argument(name, help=help), "complete", _FILE)  # noqa: B010 (shtab reads this attribute)


def _output(p: argparse.ArgumentParser, *, required: bool, metavar: str = "OUTPUT") -> None:
    action = p.add_argument(
        "-o", "--output", required=required, metavar=metavar, help="the file to write (whole, or not at all)"
    )
    setattr(action, "complete", _FILE)  # noqa: B010


def _json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckptscope",
        description="Look inside model checkpoints: list, diagnose, compare, gate, copy, export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = command("inspect", "list a checkpoint's tensors, module tree and stats")
    _path(p, "path", "a checkpoint file or folder")
    _json(p, "the listing, stats, tree and findings")
    p.add_argument("--root", default=None, help="key path of the tensor dict to show (nested checkpoints)")
    p.add_argument("--no-stats", action="store_true", help="list only; never read tensor data")
    p.add_argument(
        "--device", default=None, help="compute stats on this torch device (cuda, auto) instead of the CPU kernel"
    )
    p.add_argument(
        "--dask",
        default=None,
        type=_scheduler_argument,
        metavar="SCHEDULER",
        help="compute stats on a Dask distributed cluster: tcp://host:port, or local:N worker processes "
        "(default: CKPTSCOPE_DASK_SCHEDULER; needs the dask extra)",
    )
    p.set_defaults(func=_cmd_inspect)
    fi = command("findings", "diagnose a checkpoint: NaN/Inf, spikes, variance and norm outliers (exit 1 if any)")
    _path(fi, "path", "a checkpoint file or folder")
    fi.add_argument("--root", default=None, help="key path of the tensor dict to check (nested checkpoints)")
    _json(fi, "findings, module roll-ups and thresholds")
    fi.add_argument("--device", default=None, help="compute stats on this torch device (cuda, auto)")
    fi.set_defaults(func=_cmd_findings)
    e = command("export", "write selected modules as a new checkpoint (bytes streamed)")
    _path(e, "path", "the checkpoint to export from")
    _output(e, required=True)
    e.add_argument("--include", action="append", default=[], help="module/tensor prefix to keep (repeatable)")
    e.add_argument("--exclude", action="append", default=[], help="module/tensor prefix to drop (repeatable)")
    e.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="prefix rename (repeatable)")
    e.add_argument("--format", choices=["safetensors", "pt"], default=None, help="default: from the output name")
    e.add_argument("--freeze", action="append", default=[], help="embed a freeze plan for this module")
    e.add_argument("--root", default=None, help="key path of the tensor dict to export (nested checkpoints)")
    e.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="store floating-point tensors in this dtype; quantized GGUF tensors are dequantized to it "
        "(default: float32 for those, the rest unchanged)",
    )
    _json(e, "what was written: path, format, tensor count, bytes, dequantized tensors")
    e.set_defaults(func=_cmd_export)
    c = command("copy", "copy modules of SOURCE into TARGET (like load_state_dict), write a new file")
    _path(c, "source", "the checkpoint the values come from")
    _path(c, "target", "the checkpoint they go into (its layout is the output's)")
    c.add_argument("--map", action="append", required=True, metavar="SRC=DST", help="prefix mapping (repeatable)")
    _output(c, required=False)
    c.add_argument("--no-strict", action="store_true", help="copy what fits, report the rest")
    c.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    c.add_argument("--source-root", default=None, help="key path of the source's tensor dict")
    c.add_argument("--target-root", default=None, help="key path of the target's tensor dict")
    _json(c, "the copy report")
    c.set_defaults(func=_cmd_copy)
    fz = command("freeze", "plan which parameters to freeze")
    _path(fz, "path", "a checkpoint file or folder")
    fz.add_argument("--freeze", action="append", required=True, help="module to freeze (repeatable)")
    fz.add_argument("--root", default=None, help="key path of the tensor dict (nested checkpoints)")
    _json(fz, "the plan")
    fz.add_argument("--snippet", action="store_true", help="print the PyTorch snippet that applies the plan")
    fz.set_defaults(func=_cmd_freeze)
    d = command("diff", "compare two checkpoints tensor by tensor (exit 1 if they differ)")
    _path(d, "a", "checkpoint A")
    _path(d, "b", "checkpoint B")
    d.add_argument("--a-root", default=None, help="key path of A's tensor dict")
    d.add_argument("--b-root", default=None, help="key path of B's tensor dict")
    _json(d, "the per-tensor comparison, tree and counts")
    d.set_defaults(func=_cmd_diff)
    ck = command("check", "gate a CI pipeline: check rules on a checkpoint (exit 1 if any rule fails)")
    _path(ck, "path", "the checkpoint to check")
    ck.add_argument("--baseline", default=None, help="checkpoint to compare with (changed-only=, unchanged=)")
    ck.add_argument(
        "--rule", action="append", default=[], metavar="RULE", help="e.g. no-nan, max-abs<=100 (repeatable)"
    )
    ck.add_argument("--rules", default=None, metavar="FILE", help="a file of rules, one a line, # comments")
    ck.add_argument("--root", default=None, help="key path of the tensor dict to check")
    ck.add_argument("--baseline-root", default=None, help="key path of the baseline's tensor dict")
    _json(ck, "the results")
    ck.add_argument("--junit", default=None, metavar="FILE", help="also write the results as JUnit XML")
    ck.add_argument("--device", default=None, help="compute stats on this torch device (cuda, auto)")
    ck.set_defaults(func=_cmd_check)
    pv = command("preview", "draw a tensor as a PNG: heatmap (2-D), line plot (1-D), or a slice")
    _path(pv, "path", "a checkpoint file or folder")
    pv.add_argument("tensor", help="the tensor's full name")
    _output(pv, required=True, metavar="FILE.png")
    pv.add_argument(
        "--reduce", choices=["mean", "absmax"], default="mean", help="cells: block mean or value of largest magnitude"
    )
    pv.add_argument("--index", default=None, help="leading indices of the slice to draw, e.g. 0,3")
    pv.add_argument("--root", default=None, help="key path of the tensor dict (nested checkpoints)")
    _json(pv, "what was written: path, size, and how the tensor was drawn")
    pv.set_defaults(func=_cmd_preview)
    sp = command("spectrum", "singular values, stable rank and effective rank of a 2-D (or conv) tensor")
    _path(sp, "path", "a checkpoint file or folder")
    sp.add_argument("tensor", help="the tensor's full name")
    sp.add_argument("--root", default=None, help="key path of the tensor dict (nested checkpoints)")
    _json(sp, "the spectrum")
    sp.add_argument("--device", default=None, help="torch device for the SVD (cuda, auto); default: the stats device")
    sp.set_defaults(func=_cmd_spectrum)
    s = command("serve", "start the web server")
    s.add_argument("--host", default=None, help="default: CKPTSCOPE_HOST")
    s.add_argument("--port", type=int, default=None, help="default: CKPTSCOPE_PORT")
    s.set_defaults(func=_cmd_serve)
    m = command("migrate", "create or upgrade the catalogue's schema (serve does this too)")
    _json(m, "the revision and the catalogue")
    m.set_defaults(func=_cmd_migrate)
    co = command("completion", 'print a shell completion script: eval "$(ckptscope completion bash)"')
    co.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    co.set_defaults(func=_cmd_completion)
    return parser


def _fail(line: str) -> None:
    say(f"ckptscope: {line}", err=True)


def _run(args: argparse.Namespace) -> int:
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except KeyboardInterrupt:
        _fail("interrupted")
        return INTERRUPTED
    except Exception as exc:
        if is_closed_pipe(exc) and stdout_closed():
            raise  # the quiet `| head` case, handled by main
        failure = failure_of(exc, args.__dict__.get("path", ""))
        if failure is None:
            raise  # a bug: its traceback is wanted
        status, line = failure
        _fail(line)
        return status


def _quiet_package_log() -> None:
    """A command's answer is its one stderr line; the sandbox's log lines stay out (serve configures
    logging). Done once the arguments parsed, so ``--help`` never imports logging."""
    import logging

    package_log = logging.getLogger("ckptscope")
    if not any(isinstance(h, logging.NullHandler) for h in package_log.handlers):
        package_log.addHandler(logging.NullHandler())


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal gets escapes, not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    whole_writes_stdout()  # `| head`: a closed pipe always shows, and always as exit 141
    try:
        args = build_parser().parse_args(argv)  # --help, --version and usage errors end here
        _quiet_package_log()
        return _run(args)
    except BrokenPipeError:  # stdout's reader has gone (`| head`): the Python docs' SIGPIPE recipe
        silence_stdout()
        return CLOSED_PIPE


if __name__ == "__main__":
    raise SystemExit(main())
