"""The ``ckptscope`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.formats import CheckpointError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_inspection(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.tree import Tree

    console = Console()
    console.print(
        f"[bold]{escape(data['format'])}[/bold]: {data['tensor_count']} tensors, "
        f"{_human_bytes(data['total_bytes'])}, root {escape(repr(data['root']))}"
    )
    if len(data["roots"]) > 1:
        roots = ", ".join(f"{escape(repr(r['path']))} ({r['tensor_count']})" for r in data["roots"])
        console.print(f"roots: {roots}")
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if data["metadata"]:
        meta = Table("key", "value", title="metadata", show_lines=False)
        for key, value in list(data["metadata"].items())[:50]:
            meta.add_row(escape(key), escape(json.dumps(value)[:120]))
        console.print(meta)

    def add(branch: Tree, node: dict[str, Any]) -> None:
        for child in node.get("children", []):
            label = (
                f"{escape(child['name'])}  [dim]{child['tensor_count']} tensors, {_human_bytes(child['nbytes'])}[/dim]"
            )
            if child["nan"] or child["inf"]:
                label += f" [red]NaN {child['nan']} Inf {child['inf']}[/red]"
            add(branch.add(label), child)

    tree = Tree("[bold]modules[/bold]")
    add(tree, data["tree"])
    console.print(tree)
    table = Table("name", "kind", "dtype", "shape", "mean", "std", "min", "max", "l2", "zeros", "nan", "inf")
    for t in data["tensors"]:
        s = t.get("stats") or {}
        kind = t["kind"] + (f" = {t['alias_of']}" if t["alias_of"] else "")
        table.add_row(
            escape(t["name"]),
            escape(kind),
            t["dtype"],
            str(t["shape"]),
            *(_fmt(s.get(k)) for k in ("mean", "std", "min", "max", "l2", "zeros", "nan", "inf")),
        )
    console.print(table)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from app.services.inspect import inspect_path

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
        result = inspect_path(args.path, root=args.root, with_stats=not args.no_stats, progress=progress_cb)
    finally:
        if bar is not None:
            bar.stop()
    data = result.to_json()
    if args.json:
        json.dump(data, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_inspection(data)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptscope", description="Look inside model checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list a checkpoint's tensors, module tree and stats")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--root", default=None, help="key path of the tensor dict to show (nested checkpoints)")
    p.add_argument("--no-stats", action="store_true", help="list only; never read tensor data")
    p.set_defaults(func=_cmd_inspect)
    s = sub.add_parser("serve", help="start the web server")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"ckptscope: {args.__dict__.get('path', '')}: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown --root
        print(f"ckptscope: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
