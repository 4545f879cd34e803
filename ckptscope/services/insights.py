"""Insights of one root of a checkpoint: an init verdict per tensor, the findings of the rules and
their roll-up per module. One implementation for the UI, REST and the CLI."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from ckptscope.formats import TensorInfo
from ckptscope.formats.model import module_types_under
from ckptscope.insights.findings import SEVERITIES, Finding, TensorFacts, Thresholds, find
from ckptscope.insights.init_verdict import InitVerdict, untrained_by_module, verdict_for
from ckptscope.stats import TensorStats

if TYPE_CHECKING:
    from ckptscope.config import Settings
    from ckptscope.core import Core
    from ckptscope.store.catalogue import Content


log = logging.getLogger(__name__)
T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Overlapping calls of one key run once: the first caller computes, the others wait for its
    result (or its error). Nothing is kept once the call is over (a cache is the caller's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future[T]] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            running = self._running.get(key)
            if running is None:
                mine: Future[T] = Future()
                self._running[key] = mine
        if running is not None:
            return running.result()
        try:
            value = compute()
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        else:
            mine.set_result(value)
            return value
        finally:
            with self._lock:
                del self._running[key]

    def running(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._running


_NO_FINDINGS = dict.fromkeys(SEVERITIES, 0)


def _severities() -> dict[str, int]:
    return _NO_FINDINGS.copy()  # one per module: a copy is the cheapest new dict


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
    verdicts: dict[str, InitVerdict] = {}
    facts: list[TensorFacts] = []
    for t, s in tensors:
        v = tensor_init(t, s, module_types)
        verdicts[t.name] = v
        if t.alias_of is None:  # a tied tensor is its original's findings
            facts.append(TensorFacts(t.name, t.shape, t.dtype, t.kind, s, v))
    return _roll_up(verdicts, facts, thresholds or Thresholds())


def _roll_up(verdicts: dict[str, InitVerdict], facts: list[TensorFacts], thresholds: Thresholds) -> Insights:
    """The findings of the tensors' facts and their roll-up per module; ``verdicts``: every tensor
    of the root (tied ones too) by name, in file order."""
    findings = find(facts, thresholds)
    modules: dict[str, ModuleInsight] = {}
    for name in verdicts:
        parts = name.split(".") if name else []
        path = ""
        if path not in modules:
            modules[path] = ModuleInsight(0, 0)
        for part in parts[:-1]:  # the modules holding the tensor (``_module_paths``)
            path = f"{path}.{part}" if path else part
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
_flights: SingleFlight[Insights] = SingleFlight()


def _done(content: Content) -> bool:
    # the catalogue's side, imported here: ``analyse`` also serves the CLI, which has no catalogue
    from ckptscope.store.catalogue import StatsState

    return content.stats_state == StatsState.DONE


def checkpoint_insights(core: Core, content: Content, root: str) -> Insights:
    """The insights of a stored checkpoint's root (``root`` already checked, e.g. ``check_root``),
    from the catalogue's listing and stats. Cached once the stats are done (computed once: requests
    that ask while it is being computed wait for that computation); recomputed while they are still
    coming (tensors without stats get no value findings yet)."""
    thresholds = thresholds_of(core.settings)
    key = (content.key, root, thresholds)

    def compute() -> Insights:
        return _catalogue_insights(core, content, root, thresholds)

    if not _done(content):
        return compute()
    if (cached := _cache.get(key)) is not None:
        return cached

    def compute_and_keep() -> Insights:
        if (cached := _cache.get(key)) is not None:  # finished between the check above and this call
            return cached
        result = compute()
        _cache.put(key, result)
        return result

    return _flights.run(key, compute_and_keep)


class _RuleStats(NamedTuple):
    """What the rules read of a tensor's stats (``findings.RuleStats``), taken from its catalogue
    row's columns as ``row_to_stats`` takes them, without decoding the stored histogram (only its
    percentiles are read out of that text)."""

    numel: int
    std: float | None
    l2: float | None
    absmax: float | None
    zeros: int
    nan: int
    inf: int
    percentiles: dict[str, float] | None


_PERCENTILES = re.compile(r'"percentiles"\s*:\s*')
_DECODER = json.JSONDecoder()


def _percentiles(hist: str) -> Any:
    """The ``percentiles`` of a stored histogram's JSON text (``row_to_stats``'s
    ``hist.get("percentiles")``), decoding that value alone. The key can only be the object's own:
    inside a JSON string every quote is escaped."""
    at = hist.find('"percentiles":')  # as ``dumps`` writes it
    if at >= 0:
        at += 14
        while hist[at] in " \t\n\r":
            at += 1
        return _DECODER.raw_decode(hist, at)[0]
    found = _PERCENTILES.search(hist)  # a space before the colon
    if found is None:
        return json.loads(hist).get("percentiles")  # not in the text: absent
    return _DECODER.raw_decode(hist, found.end())[0]


def _catalogue_insights(core: Core, content: Content, root: str, thresholds: Thresholds) -> Insights:
    """``analyse`` of a stored root, read in one pass over its catalogue rows: the rules' figures and
    the stored init verdict straight from the columns (no histogram decoded, no listing record
    made); a row without stats or without a stored verdict goes through ``analyse``'s own
    ``tensor_init`` with its full records, so the result is ``analyse``'s."""
    from ckptscope.formats.model import relative_name
    from ckptscope.store.queries import int_tuple, row_to_stats

    module_types = module_types_under(content.module_types or {}, root)
    _, rows = core.queries.tensor_rows(content, root, limit=max(content.tensor_count, 1))
    verdicts: dict[str, InitVerdict] = {}
    facts: list[TensorFacts] = []
    from_json = InitVerdict.from_json
    loads = json.loads
    for r in rows:
        name = relative_name(r["name"], root) or r["name"]
        hist, init = r["hist"], r["init"]
        if hist is not None and init is not None:
            stats: _RuleStats | TensorStats | None = _RuleStats(
                r["numel"], r["std"], r["l2"], r["absmax"], r["zeros"] or 0, r["nan"] or 0, r["inf"] or 0,
                _percentiles(hist),
            )  # fmt: skip
            v = from_json(loads(init))
            shape, dtype, kind = int_tuple(r["shape"]), r["dtype"], r["kind"]
        else:
            info, stats = core.queries.row_to_info(r, root), row_to_stats(r)
            v = tensor_init(info, stats, module_types)
            shape, dtype, kind = info.shape, info.dtype, info.kind
        verdicts[name] = v
        alias = relative_name(r["alias_of"], root) if r["alias_of"] else None
        if alias is None:  # a tied tensor is its original's findings
            facts.append(TensorFacts(name, shape, dtype, kind, stats, v))
    return _roll_up(verdicts, facts, thresholds)


def cached_insights(core: Core, content: Content, root: str) -> Insights | None:
    """The insights ``checkpoint_insights`` has kept for finished stats; None when they are not
    computed yet (or the stats are not done)."""
    if not _done(content):
        return None
    return _cache.get((content.key, root, thresholds_of(core.settings)))


def prepare_checkpoint_view(core: Core, content: Content, root: str) -> None:
    """Build the module tree and compute the insights of a root, for a page that did not wait for
    them (run after its response is sent): its fragments then get them, or wait for this. Errors
    are logged only: the fragment that asks next computes again and reports them."""
    from . import checkpoints

    try:
        checkpoints.module_tree(core, content, root)
        if _done(content):
            checkpoint_insights(core, content, root)
    except Exception:
        log.exception("preparing the tree and insights of %s failed", content.key)


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
