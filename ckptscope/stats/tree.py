"""The module tree: dotted tensor names grouped into nested modules, with roll-ups."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ckptscope.formats.model import TensorInfo


def module_order(parts: Sequence[str]) -> list[str]:
    """Name parts in file order, except that the integer ones (layers.0, layers.10) take the places
    of integer parts in numeric order: ``["a", "10", "2", "b"]`` -> ``["a", "2", "10", "b"]``."""
    digits = [p for p in parts if p.isdigit()]
    if not digits:
        return list(parts)
    numeric = iter(sorted(digits, key=int))
    return [next(numeric) if p.isdigit() else p for p in parts]


@dataclass(slots=True)
class TreeNode:
    name: str  # this path part ("" for the root)
    path: str  # full dotted prefix ("" for the root)
    children: dict[str, TreeNode] = field(default_factory=dict)
    tensor: TensorInfo | None = None
    tensor_count: int = 0
    numel: int = 0
    param_numel: int = 0  # parameters only, aliases counted once
    param_dtypes: dict[str, int] = field(default_factory=dict)  # param_numel by shown dtype
    buffer_count: int = 0
    alias_count: int = 0
    nbytes: int = 0  # aliases counted once
    dtypes: dict[str, int] = field(default_factory=dict)
    nan: int = 0
    inf: int = 0
    module_type: str | None = None  # the class of the pickled module at this path (whole-module pickles)

    def child_list(self) -> list[TreeNode]:
        """Children in file order, except that integer parts sort numerically (``module_order``)."""
        if not self.children:  # a tensor's node
            return []
        return [self.children[k] for k in module_order(list(self.children))]

    def find(self, path: str) -> TreeNode | None:
        node: TreeNode | None = self
        if path:
            for part in path.split("."):
                node = node.children.get(part) if node else None
        return node

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "is_tensor": self.tensor is not None,
            "has_children": bool(self.children),
            "tensor_count": self.tensor_count,
            "numel": self.numel,
            "param_numel": self.param_numel,
            "buffer_count": self.buffer_count,
            "alias_count": self.alias_count,
            "nbytes": self.nbytes,
            "dtypes": dict(self.dtypes),
            "nan": self.nan,
            "inf": self.inf,
            "module_type": self.module_type,
        }

    def to_json(self, depth: int | None = None) -> dict[str, Any]:
        out = self.summary()
        if depth is None or depth > 0:
            out["children"] = [c.to_json(None if depth is None else depth - 1) for c in self.child_list()]
        return out


class NonFinite(Protocol):
    """What the tree rolls up of a tensor's stats (``TensorStats`` and ``NonFiniteCounts`` have it)."""

    @property
    def nan(self) -> int: ...

    @property
    def inf(self) -> int: ...


class NonFiniteCounts(NamedTuple):
    """A tensor's NaN and Inf counts alone: all a tree needs of its stats."""

    nan: int
    inf: int


def build_tree(
    tensors: Iterable[TensorInfo],
    stats: Mapping[str, NonFinite] | None = None,
    module_types: Mapping[str, str] | None = None,
) -> TreeNode:
    """``stats``: tensor name -> its stats (or just its NaN and Inf counts; a tensor missing has
    none); ``module_types``: module path (relative to the tree's root, "" for it) -> class name."""
    root = TreeNode("", "")
    for t in tensors:
        node = root
        chain = [root]
        for part in t.name.split("."):
            child = node.children.get(part)
            if child is None:
                child = TreeNode(part, f"{node.path}.{part}" if node.path else part)
                node.children[part] = child
            node = child
            chain.append(node)
        node.tensor = t
        # each tensor's figures once (its properties compute them), then added along its chain
        s = stats.get(t.name) if stats else None
        numel, dtype, nbytes = t.numel, t.shown_dtype, t.nbytes
        alias, parameter, buffer = (
            t.alias_of is not None and t.alias_of != "",
            t.kind == "parameter",
            t.kind == "buffer",
        )
        nan, inf = (s.nan, s.inf) if s is not None else (0, 0)
        for n in chain:
            n.tensor_count += 1
            n.numel += numel
            n.dtypes[dtype] = n.dtypes.get(dtype, 0) + 1
            if alias:
                n.alias_count += 1
            else:
                n.nbytes += nbytes
                if parameter:
                    n.param_numel += numel
                    n.param_dtypes[dtype] = n.param_dtypes.get(dtype, 0) + numel
            if buffer:
                n.buffer_count += 1
            n.nan += nan
            n.inf += inf
    for path, cls in (module_types or {}).items():
        found = root.find(path)
        if found is not None:
            found.module_type = cls
    return root


class TreeCache:
    """The most recently used module trees (a tree of a big checkpoint takes a while to build)."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._trees: OrderedDict[Hashable, TreeNode] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], TreeNode]) -> TreeNode:
        with self._lock:
            tree = self._trees.get(key)
            if tree is not None:
                self._trees.move_to_end(key)
                return tree
        tree = build()
        with self._lock:
            self._trees[key] = tree
            while len(self._trees) > self._size:
                self._trees.popitem(last=False)
        return tree
