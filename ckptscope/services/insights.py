"""Insights of one root of a checkpoint: an init verdict per tensor, the findings of the rules and
their roll-up per module. One implementation for the UI, REST and the CLI."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptscope.formats import TensorInfo
from ckptscope.formats.model import module_types_under
from ckptscope.insights.findings import SEVERITIES, Finding, TensorFacts, Thresholds, find
from ckptscope.insights.init_verdict import InitVerdict, untrained_by_module, verdict_for
from ckptscope.stats import TensorStats

if TYPE_CHECKING:
    from ckptscope.config import Settings
    from ckptscope.core import Core
    from ckptscope.store.catalogue import Content


def _severities() -> dict[str, int]:
    return dict.fromkeys(SEVERITIES, 0)


@dataclass(slots=True)
class ModuleInsight:
    layers: int  # weight tensors (a Linear's, a Conv's ...) at or under this module with an init verdict
    untrained: int  # of those, the ones that look untrained ("3 of 24 layers look untrained")
    findings: dict[str, int] = field(default_factory=_severities)  # severity -> count, at or under here

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "untrained": self.untrained, "findings": dict(self.findings)}


@dataclass(slots=True)
class Insights:
    init: dict[str, InitVerdict]  # tensor name -> verdict
    findings: list[Finding]
    modules: dict[str, ModuleInsight]  # module path ("" for the root) -> roll-up
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_json(self) -> dict[str, Any]:
        return {
            "findings": [f.to_json() for f in self.findings],
            "modules": {path: m.to_json() for path, m in self.modules.items()},
            "thresholds": self.thresholds.to_json(),
        }


def _module_paths(name: str) -> list[str]:
    """The modules holding a tensor or module: ``a.b.c`` -> ``["", "a", "a.b"]``."""
    parts = name.split(".") if name else []
    return ["", *(".".join(parts[:i]) for i in range(1, len(parts)))]


def tensor_init(t: TensorInfo, stats: TensorStats | None, module_types: Mapping[str, str] | None = None) -> InitVerdict:
    """A tensor's init verdict: the one the stats job stored with its stats, else judged now
    (``verdict_for``; ``module_types``: module path -> class name, relative to its root)."""
    if stats is not None and stats.init is not None:
        return InitVerdict.from_json(stats.init)
    return verdict_for(t, stats, module_types)


def init_json(t: TensorInfo, stats: TensorStats | None, module_types: Mapping[str, str] | None = None) -> Any:
    """The ``init`` of a tensor's JSON: ``{verdict, matches, score}``, null while it has no stats."""
    return None if stats is None else tensor_init(t, stats, module_types).to_json()


def analyse(
    tensors: Sequence[tuple[TensorInfo, TensorStats | None]],
    thresholds: Thresholds | None = None,
    *,
    module_types: Mapping[str, str] | None = None,
) -> Insights:
    """``tensors``: one root's tensors (names relative to it) with their stats (None while pending);
    ``module_types``: module path -> class name (whole-module pickles), for the init verdicts."""
    thresholds = thresholds or Thresholds()
    verdicts: dict[str, InitVerdict] = {}
    facts: list[TensorFacts] = []
    for t, s in tensors:
        v = tensor_init(t, s, module_types)
        verdicts[t.name] = v
        if t.alias_of is None:  # a tied tensor is its original's findings
            facts.append(TensorFacts(t.name, t.shape, t.dtype, t.kind, s, v))
    findings = find(facts, thresholds)
    modules: dict[str, ModuleInsight] = {}
    for t, _ in tensors:
        for path in _module_paths(t.name):
            if path not in modules:
                modules[path] = ModuleInsight(0, 0)
    for path, (layers, untrained) in untrained_by_module({f.name: f.init for f in facts if f.init}).items():
        if path in modules:
            modules[path].layers, modules[path].untrained = layers, untrained
    for found in findings:
        paths = _module_paths(found.target) + ([found.target] if found.level == "module" else [])
        for path in paths:
            if path in modules:
                modules[path].findings[found.severity] += 1
    return Insights(verdicts, findings, modules, thresholds)


def thresholds_of(settings: Settings) -> Thresholds:
    """The thresholds this installation uses (CKPTSCOPE_FINDINGS_THRESHOLDS, else the defaults)."""
    return settings.findings_threshold_values


class _Cache:
    """Insights of finished contents (their stats never change again), most recently used first."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Insights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Insights | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Hashable, value: Insights) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_cache = _Cache()


def checkpoint_insights(core: Core, content: Content, root: str) -> Insights:
    """The insights of a stored checkpoint's root (``root`` already checked, e.g. ``check_root``),
    from the catalogue's listing and stats. Cached once the stats are done; recomputed while
    they are still coming (tensors without stats get no value findings yet)."""
    # the catalogue's side, imported here: ``analyse`` also serves the CLI, which has no catalogue
    from ckptscope.store.catalogue import StatsState

    from . import checkpoints

    thresholds = thresholds_of(core.settings)
    key = (content.key, root, thresholds)
    done = content.stats_state == StatsState.DONE
    if done and (cached := _cache.get(key)) is not None:
        return cached
    pairs = checkpoints.all_tensors(core, content, root)
    result = analyse(pairs, thresholds, module_types=module_types_under(content.module_types or {}, root))
    if done:
        _cache.put(key, result)
    return result


def decorate_tree(node: dict[str, Any], insights: Insights) -> dict[str, Any]:
    """Add ``layers``, ``untrained`` and ``findings`` (by severity) to a tree's JSON (``TreeNode.to_json``),
    in place, for every node it holds; a tensor node gets its own findings' counts."""
    per_tensor: dict[str, dict[str, int]] = {}
    for f in insights.findings:
        if f.level == "tensor":
            per_tensor.setdefault(f.target, _severities())[f.severity] += 1
    stack = [node]
    while stack:
        n = stack.pop()
        module = insights.modules.get(n["path"])
        if module is not None and n.get("has_children"):
            n |= module.to_json()
        else:
            n |= {"layers": 0, "untrained": 0, "findings": per_tensor.get(n["path"], _severities())}
        stack.extend(n.get("children") or ())
    return node
