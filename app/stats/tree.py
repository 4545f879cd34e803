"""The module tree: dotted tensor names grouped into nested modules, with roll-ups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.formats.model import TensorInfo

from .model import TensorStats


@dataclass(slots=True)
class TreeNode:
    name: str  # this path part ("" for the root)
    path: str  # full dotted prefix ("" for the root)
    children: dict[str, TreeNode] = field(default_factory=dict)
    tensor: TensorInfo | None = None
    tensor_count: int = 0
    numel: int = 0
    param_numel: int = 0  # parameters only, aliases counted once
    buffer_count: int = 0
    alias_count: int = 0
    nbytes: int = 0  # aliases counted once
    dtypes: dict[str, int] = field(default_factory=dict)
    nan: int = 0
    inf: int = 0

    def child_list(self) -> list[TreeNode]:
        """Children in file order, except that integer parts (layers.0, layers.10) sort numerically."""
        keys = list(self.children)
        numeric = sorted((k for k in keys if k.isdigit()), key=int)
        it = iter(numeric)
        ordered = [next(it) if k.isdigit() else k for k in keys]
        return [self.children[k] for k in ordered]

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
        }

    def to_json(self, depth: int | None = None) -> dict[str, Any]:
        out = self.summary()
        if depth is None or depth > 0:
            out["children"] = [c.to_json(None if depth is None else depth - 1) for c in self.child_list()]
        return out


def build_tree(tensors: Iterable[TensorInfo], stats: Mapping[str, TensorStats] | None = None) -> TreeNode:
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
        s = stats.get(t.name) if stats else None
        for n in chain:
            n.tensor_count += 1
            n.numel += t.numel
            n.dtypes[t.dtype] = n.dtypes.get(t.dtype, 0) + 1
            if t.alias_of:
                n.alias_count += 1
            else:
                n.nbytes += t.nbytes
                if t.kind == "parameter":
                    n.param_numel += t.numel
            if t.kind == "buffer":
                n.buffer_count += 1
            if s is not None:
                n.nan += s.nan
                n.inf += s.inf
    return root
