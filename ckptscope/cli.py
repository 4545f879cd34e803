"""The ``ckptscope`` command line."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ckptscope.errors import CheckpointError, CkptscopeError, Invalid
from ckptscope.stats.model import STATISTICS
from ckptscope.text import make_storable, reveal, storable_text
from ckptscope.units import human_bytes

if TYPE_CHECKING:
    from ckptscope.formats import Checkpoint


class _FileError(Exception):
    """An input file that could not be read: reported as ``ckptscope: PATH: reason``."""

    def __init__(self, path: str, error: CkptscopeError) -> None:
        super().__init__(str(error))
        self.path = path
        self.error = error


def _say(line: str, *, err: bool = False) -> None:
    """Print one line. Every line the CLI prints comes here: names, metadata, warnings and error
    messages are attacker text, so no control character (ESC sequences, OSC 52 clipboard writes,
    BEL, bidi overrides, newlines) ever reaches the terminal raw."""
    print(reveal(line), file=sys.stderr if err else sys.stdout)


def _rich(value: object) -> str:
    """Attacker text for a rich table or tree: escaped for the terminal, then for rich markup."""
    from rich.markup import escape

    return escape(reveal(str(value)))


def _open(path: str) -> Checkpoint:
    """List one input file exactly as the server does: parsed in a fresh sandboxed child process
    (the CKPTSCOPE_PARSE_* limits: memory, CPU time, wall clock), so a hostile file can hang,
    crash or exhaust only that child, never this process or the next file; then the text rule of
    the catalogue (``make_storable``). Statistics are computed here, on the validated listing."""
    from ckptscope.config import Settings
    from ckptscope.formats.sandbox import open_checkpoint_sandboxed

    try:
        # absolute: the child runs in another directory; shards=None: shards beside a local index
        listing = open_checkpoint_sandboxed(os.path.abspath(path), limits=Settings().parse_limits, shards=None)
        make_storable(listing)
    except CkptscopeError as exc:
        raise _FileError(path, exc) from None
    return listing


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_inspection(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree

    console = Console()
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
    progress_cb = None
    bar = None
    if not args.no_stats and sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        bar = Progress("stats", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
        task = bar.add_task("stats", total=None)
        bar.start()

        def progress_cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

    try:
        result = inspect_listing(
            listing, root=args.root, with_stats=not args.no_stats, progress=progress_cb, device=args.device
        )
    finally:
        if bar is not None:
            bar.stop()
    data = result.to_json()
    if args.json:
        sys.stdout.write(json.dumps(data, allow_nan=False) + "\n")  # dumps: the C encoder
    else:
        _print_inspection(data)
    return 0


def _pairs(values: list[str]) -> dict[str, str]:
    from ckptscope.services.selection import parse_pairs

    return parse_pairs(values)


def _sha256(path: str, listing: Checkpoint | None = None) -> str:
    """A file's sha256; for a folder, the digest of its files' names and hashes (the rule of a
    multi-file upload's content key), over the files the listing was read from."""
    import hashlib

    if listing is not None and os.path.isdir(path):
        parts = sorted((Path(f).name, _sha256(f)) for f in listing.files)
        return parts[0][1] if len(parts) == 1 else hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_name(path: str) -> str:
    """An input's file name as recorded in an output's metadata (as text any writer can store)."""
    return str(storable_text(Path(path).name))


def _write_atomically(out: str, write: Any) -> None:
    import tempfile

    target = Path(out)
    fd, temp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temp))
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)


def _format_for_output(path: str, requested: str | None) -> str:
    if requested:
        return requested
    return "safetensors" if path.endswith(".safetensors") else "pt"


def _cmd_export(args: argparse.Namespace) -> int:
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
    metadata = export_metadata(_file_name(args.path), source_sha, selection, plan, ckpt.metadata, fmt, decoded)
    _write_atomically(args.output, lambda p: write_checkpoint(p, outputs, fmt, metadata))
    _say(f"wrote {len(outputs)} tensors to {args.output} ({fmt})")
    if decoded:
        _say(dequantized_text(decoded))
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from ckptscope.services.operations import copy_metadata, copy_report, output_format_for, write_checkpoint

    src = _open(args.source)
    dst = _open(args.target)
    source_root, target_root = src.resolve_root(args.source_root), dst.resolve_root(args.target_root)
    strict = not args.no_strict
    report = copy_report(src.root_tensors(source_root), dst.root_tensors(target_root), _pairs(args.map), strict)
    data = report.to_json()
    written = False
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
        _write_atomically(args.output, lambda p: write_checkpoint(p, report.outputs, fmt, meta))
        written = True
    if args.json:
        print(json.dumps({"written": written, "report": data}))
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
        _say(f"wrote {args.output}" if written else "nothing written")
    if not args.dry_run and not report.ok and strict:
        _say("ckptscope: strict copy refused (use --no-strict to copy what fits)", err=True)
        return 1
    return 0


def _cmd_freeze(args: argparse.Namespace) -> int:
    from ckptscope.services.operations import freeze_plan

    ckpt = _open(args.path)
    plan = freeze_plan(ckpt.root_tensors(args.root), args.freeze)
    if args.snippet:
        for line in plan.snippet().splitlines():  # Python source: names in it are repr()s
            _say(line)
    elif args.json:
        print(json.dumps(plan.to_json()))
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
    result = diff_tensors(a.root_tensors(args.a_root), b.root_tensors(args.b_root))
    if args.json:
        print(json.dumps(result))
        return 0
    _say(", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    for row in result["tensors"]:
        if row["status"] != "identical":
            extra = ""
            if row.get("max_abs_diff") is not None:
                extra = (
                    f" max|a-b| {row['max_abs_diff']:.4g} rel-L2 {_fmt(row.get('rel_l2'))}"
                    f" cos {_fmt(row.get('cosine'))}"
                )
            _say(f"{row['status']:>14}  {row['name']}{extra}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ckptscope import logs
    from ckptscope.config import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    logs.configure()
    log = logging.getLogger("ckptscope")
    if settings.stats_device:
        from ckptscope.stats.torch_engine import resolve_device

        try:
            resolve_device(settings.stats_device)
        except RuntimeError as exc:
            _say(f"ckptscope: CKPTSCOPE_STATS_DEVICE: {exc}", err=True)
            return 2
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
    uvicorn.run(
        "ckptscope.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def _cmd_migrate(_args: argparse.Namespace) -> int:
    from ckptscope.config import get_settings
    from ckptscope.store.catalogue import make_engine
    from ckptscope.store.migrate import upgrade

    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        _say(f"catalogue schema at revision {upgrade(engine)} ({engine.url.render_as_string(hide_password=True)})")
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptscope", description="Look inside model checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list a checkpoint's tensors, module tree and stats")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--root", default=None, help="key path of the tensor dict to show (nested checkpoints)")
    p.add_argument("--no-stats", action="store_true", help="list only; never read tensor data")
    p.add_argument(
        "--device", default=None, help="compute stats on this torch device (cuda, auto) instead of the CPU kernel"
    )
    p.set_defaults(func=_cmd_inspect)
    e = sub.add_parser("export", help="write selected modules as a new checkpoint (bytes streamed)")
    e.add_argument("path")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--include", action="append", default=[], help="module/tensor prefix to keep (repeatable)")
    e.add_argument("--exclude", action="append", default=[], help="module/tensor prefix to drop (repeatable)")
    e.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="prefix rename (repeatable)")
    e.add_argument("--format", choices=["safetensors", "pt"], default=None, help="default: from the output name")
    e.add_argument("--freeze", action="append", default=[], help="embed a freeze plan for this module")
    e.add_argument("--root", default=None)
    e.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="store floating-point tensors in this dtype; quantized GGUF tensors are dequantized to it "
        "(default: float32 for those, the rest unchanged)",
    )
    e.set_defaults(func=_cmd_export)
    c = sub.add_parser("copy", help="copy modules of SOURCE into TARGET (like load_state_dict), write a new file")
    c.add_argument("source")
    c.add_argument("target")
    c.add_argument("--map", action="append", required=True, metavar="SRC=DST", help="prefix mapping (repeatable)")
    c.add_argument("-o", "--output")
    c.add_argument("--no-strict", action="store_true", help="copy what fits, report the rest")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--source-root", default=None)
    c.add_argument("--target-root", default=None)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_copy)
    fz = sub.add_parser("freeze", help="plan which parameters to freeze")
    fz.add_argument("path")
    fz.add_argument("--freeze", action="append", required=True, help="module to freeze (repeatable)")
    fz.add_argument("--root", default=None)
    fz.add_argument("--json", action="store_true")
    fz.add_argument("--snippet", action="store_true", help="print the PyTorch snippet that applies the plan")
    fz.set_defaults(func=_cmd_freeze)
    d = sub.add_parser("diff", help="compare two checkpoints tensor by tensor")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--a-root", default=None)
    d.add_argument("--b-root", default=None)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_diff)
    s = sub.add_parser("serve", help="start the web server")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=_cmd_serve)
    m = sub.add_parser("migrate", help="create or upgrade the catalogue's schema (serve does this too)")
    m.set_defaults(func=_cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal gets escapes, not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    # a command's answer is its one stderr line; the sandbox's log lines stay out (serve configures logging)
    package_log = logging.getLogger("ckptscope")
    if not any(isinstance(h, logging.NullHandler) for h in package_log.handlers):
        package_log.addHandler(logging.NullHandler())
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _FileError as exc:
        _say(f"ckptscope: {exc.path}: {exc.error}", err=True)
        return 2
    except CheckpointError as exc:
        _say(f"ckptscope: {args.__dict__.get('path', '')}: {exc}", err=True)
        return 2
    except CkptscopeError as exc:
        _say(f"ckptscope: {exc}", err=True)
        return 2
    except OSError as exc:  # an output that cannot be written, a parser that cannot be started
        _say(f"ckptscope: {exc}", err=True)
        return 2
    except ValidationError as exc:  # a CKPTSCOPE_* setting out of range
        first = exc.errors()[0]
        name = "CKPTSCOPE_" + "_".join(str(part) for part in first["loc"]).upper()
        _say(f"ckptscope: {name}: {first['msg']}", err=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
