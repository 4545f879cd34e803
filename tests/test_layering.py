"""The package's dependencies point one way (shared/DESIGN.md): the domain rooms never import the
faces or FastAPI, the faces never import each other, and no two rooms import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ckptscope"
FACES = {"web", "api", "http", "cli", "main"}
DOMAIN = {"formats", "stats", "store", "insights"}
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn", "jinja2", "python_multipart")


def _room(module: str) -> str:
    """``ckptscope.stats.engine`` -> ``stats``; ``ckptscope.core`` -> ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    name = f"{base}.{child.module}" if child.module else base
                else:
                    name = child.module or ""
                found.append((name, top))
                found.extend((f"{name}.{alias.name}", top) for alias in child.names)
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, True)
    return found


def _graph() -> dict[str, set[tuple[str, bool]]]:
    graph: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        graph[_module_name(path)].update(_imports(path))
    return graph


def test_domain_rooms_never_import_the_faces_services_jobs_or_fastapi():
    for module, imports in _graph().items():
        if _room(module) not in DOMAIN:
            continue
        for name, _ in imports:
            assert not name.startswith(WEB_FRAMEWORKS), f"{module} imports {name}"
            if name.startswith("ckptscope."):
                assert _room(name) not in FACES | {"services", "jobs", "core"}, f"{module} imports {name}"


def test_readers_stats_and_insights_never_reach_the_catalogue():
    """What lets scripts/test.sh leave their tests out of the PostgreSQL pass."""
    for module, imports in _graph().items():
        if _room(module) not in {"formats", "stats", "insights"}:
            continue
        for name, _ in imports:
            assert not name.startswith(("sqlalchemy", "ckptscope.store", "ckptscope.config")), (
                f"{module} imports {name}"
            )


def test_the_cpu_stats_path_never_imports_torch_at_module_level():
    """torch is imported where a torch-op engine, a spectrum or a writer's cast runs, never on import
    of the readers or the stats engine (tests/stats/test_torch_free.py runs it without torch)."""
    allowed = {"ckptscope.stats.torch_engine", "ckptscope.stats.compare", "ckptscope.formats.tensor_views"}
    for module, imports in _graph().items():
        if _room(module) not in {"formats", "stats"} or module in allowed:
            continue
        for name, top in imports:
            assert not (top and (name == "torch" or name.startswith("torch."))), f"{module} imports {name}"


def test_the_faces_do_not_import_each_other():
    for module, imports in _graph().items():
        room = _room(module)
        for name, _ in imports:
            if not name.startswith("ckptscope."):
                continue
            other = _room(name)
            if room in ("web", "api"):
                assert other not in {"web", "api"} - {room}, f"{module} imports {name}"
            if room == "http":
                assert other not in ("web", "api"), f"{module} imports {name}"


def _assert_acyclic(edges: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for other in sorted(edges.get(node, ())):
            assert state.get(other) != 1, "import circle: " + " -> ".join([*path, node, other])
            if other not in state:
                walk(other, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [])


def test_no_import_circles_between_rooms():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in _graph().items():
        room = _room(module)
        for name, top in imports:
            other = _room(name) if name.startswith("ckptscope.") else ""
            if top and other and other != room and room:
                edges[room].add(other)
    _assert_acyclic(edges)


def test_no_import_circles_between_modules():
    graph = _graph()
    # a package's __init__ importing its own submodules is not a circle
    _assert_acyclic(
        {
            m: {n for n, top in imports if top and n in graph and n != m and not n.startswith(m + ".")}
            for m, imports in graph.items()
        }
    )
