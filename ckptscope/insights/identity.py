"""Content identity of modules: a digest per module from its members' relative names and digests.

A tensor's digest (``ckptscope.stats.digest``) is ``"xxh3-128:<32 hex>"`` of its dtype, shape and
logical bytes in C order, so the same tensor has the same digest in any file format. A module's
digest extends that to a whole module, independently of where the module sits:

* The module ``M`` of a list of dotted tensor names is every proper prefix of a name, cut at a dot
  (``""``, the root, holds every tensor). Its *entries* are its direct children: for each name
  ``M.c`` that is a tensor, the entry ``[c, "tensor", <tensor digest>]``; for each ``M.c`` that is
  itself a module, ``[c, "module", <module digest of M.c>]`` (a name may be both).
* ``digest(M) = "xxh3-128:" + xxh3_128_hexdigest(MODULE_DOMAIN + json(entries))`` where the entries
  are sorted (by child name, then kind) and ``json`` is ``json.dumps(entries, ensure_ascii=True,
  separators=(",", ":"))`` encoded as ASCII; ``MODULE_DOMAIN`` is ``b"ckptscope-module-v1\\n"``.
* When any tensor below ``M`` has no digest (its stats are not computed), ``digest(M)`` is None.

This is a Merkle tree over the module tree: two modules have the same digest exactly when they hold
the same tensors (dtype, shape, bytes) under the same names relative to the module (up to xxh3-128
collisions), so ``encoder.layer.0`` of one checkpoint equals ``layers.3`` of another when their
members match, and computing every module's digest takes one pass over the names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import xxhash

DIGEST_PATTERN = r"^xxh3-128:[0-9a-f]{32}$"  # a tensor's or module's digest (``stats.digest.is_digest``)
MODULE_DOMAIN = b"ckptscope-module-v1\n"


@dataclass(frozen=True, slots=True)
class ModuleIdentity:
    digest: str | None  # None: some tensor below has no digest
    tensor_count: int  # tensors below the module (every level)


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    tensor: bool = False
    tensor_digest: str | None = None


def module_identities(named: Iterable[tuple[str, str | None]]) -> dict[str, ModuleIdentity]:
    """Every module path of the names (``""`` for the root) -> its digest and tensor count."""
    root = _Node()
    for name, digest in named:
        node = root
        for segment in name.split("."):
            node = node.children.setdefault(segment, _Node())
        node.tensor = True
        node.tensor_digest = digest
    out: dict[str, ModuleIdentity] = {}
    # post-order without recursion (names may hold thousands of dots)
    stack: list[tuple[str, _Node, bool]] = [("", root, False)]
    while stack:
        path, node, expanded = stack.pop()
        modules = {c: n for c, n in node.children.items() if n.children}
        if not expanded:
            stack.append((path, node, True))
            stack.extend((f"{path}.{c}" if path else c, n, False) for c, n in modules.items())
            continue
        entries: list[list[str]] = []
        count = 0
        known = True
        for child, n in node.children.items():
            if n.tensor:
                count += 1
                if n.tensor_digest is None:
                    known = False
                else:
                    entries.append([child, "tensor", n.tensor_digest])
            if n.children:
                sub = out[f"{path}.{child}" if path else child]
                count += sub.tensor_count
                if sub.digest is None:
                    known = False
                else:
                    entries.append([child, "module", sub.digest])
        out[path] = ModuleIdentity(_module_digest(entries) if known else None, count)
    return out


def module_digests(named: Iterable[tuple[str, str | None]]) -> dict[str, str | None]:
    """Every module path of ``named`` ((tensor name, tensor digest or None) pairs) -> its digest
    (None when a tensor below it has none). See the module's docstring for the definition."""
    return {path: m.digest for path, m in module_identities(named).items()}


def _module_digest(entries: list[list[str]]) -> str:
    entries.sort()
    text = json.dumps(entries, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(MODULE_DOMAIN + text)


@dataclass(frozen=True, slots=True)
class ModuleMatch:
    a: str
    b: str

    def to_json(self) -> dict[str, str]:
        return {"a": self.a, "b": self.b}


def moved_modules(a: Mapping[str, str | None], b: Mapping[str, str | None]) -> list[ModuleMatch]:
    """Modules of ``a`` that ``b`` holds under another path: a path of ``a`` that is no module of
    ``b`` whose digest is that of a module of ``b`` whose path ``a`` lacks (a renamed module,
    ``encoder.layer.0`` -> ``layers.3``). Outermost only: the modules inside a moved one moved too."""
    where_b: dict[str, str] = {}
    for path in sorted(b):
        digest = b[path]
        if digest is not None and path not in a:
            where_b.setdefault(digest, path)
    found: list[ModuleMatch] = []
    moved: set[str] = set()
    for path in sorted(a, key=lambda p: (p.count("."), p)):  # outer modules first
        digest = a[path]
        if digest is None or path in b or digest not in where_b:
            continue
        parts = path.split(".")
        if any(".".join(parts[:i]) in moved for i in range(1, len(parts))):
            continue
        moved.add(path)
        found.append(ModuleMatch(path, where_b[digest]))
    return sorted(found, key=lambda m: m.a)
