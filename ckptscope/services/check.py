"""The CI gate: run rules (``ckptscope.insights.rules``) on a checkpoint root's tensors and stats,
against a baseline's where a rule compares. One implementation for the CLI and REST."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptscope.errors import CkptscopeError
from ckptscope.insights.rules import (
    Rule,
    RuleError,
    RuleResult,
    Subject,
    Tensors,
    evaluate_all,
    parse_rules,
)
from ckptscope.store.catalogue import StatsState

if TYPE_CHECKING:
    from ckptscope.core import Core
    from ckptscope.store.catalogue import Content

    from .insights import Insights


class StatsNotReady(CkptscopeError):
    """A stored checkpoint whose stats are still being computed (or failed): rules need them."""

    status = 409
    default_code = "stats_pending"


@dataclass(frozen=True, slots=True)
class CheckReport:
    results: list[RuleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "results": [r.to_json() for r in self.results]}


def prepare(texts: Sequence[str], *, has_baseline: bool) -> list[Rule]:
    """Parse the rules before any work: a malformed rule, no rule at all, or a baseline rule
    without a baseline is a ``RuleError``."""
    rules = parse_rules(texts)
    if not rules:
        raise RuleError("no rules to check (give at least one)")
    needing = [r.text for r in rules if r.needs_baseline]
    if needing and not has_baseline:
        raise RuleError(f"rule {needing[0]!r} compares with a baseline: give one")
    return rules


def with_digests(tensors: Tensors) -> Tensors:
    """``tensors`` with a digest in every stats record: one the stats pass did not record (stats
    computed before digests existed) is computed from the tensor's bytes (``tensor_digest``)."""
    if all(s is None or s.digest is not None for _, s in tensors):
        return tensors
    from dataclasses import replace

    from ckptscope.stats.digest import tensor_digest

    return [(t, replace(s, digest=tensor_digest(t)) if s is not None and s.digest is None else s) for t, s in tensors]


def run_rules(
    rules: Sequence[Rule],
    tensors: Tensors,
    baseline: Tensors | None = None,
    *,
    insights: Callable[[], Insights] | None = None,
    module_types: Mapping[str, str] | None = None,
) -> CheckReport:
    """``insights``: where the init verdicts and findings come from (computed once, and only when
    a rule needs them); by default ``services.insights.analyse`` on ``tensors`` with the default
    thresholds. Where a rule compares with the baseline, missing digests are computed."""
    if insights is None:
        from .insights import analyse

        def insights() -> Insights:
            return analyse(tensors, module_types=module_types)

    cache: list[Insights] = []

    def once() -> Insights:
        if not cache:
            cache.append(insights())
        return cache[0]

    if baseline is not None and any(r.needs_baseline for r in rules):
        tensors, baseline = with_digests(tensors), with_digests(baseline)
    subject = Subject(tensors, init=lambda: once().init, findings=lambda: once().findings)
    return CheckReport(evaluate_all(rules, subject, baseline))


def _ready(content: Content) -> None:
    if content.stats_state == StatsState.FAILED:
        raise StatsNotReady(f"the stats of this checkpoint failed: {content.stats_error}", "stats_failed")
    if content.stats_state != StatsState.DONE:
        raise StatsNotReady(f"the stats of this checkpoint are not computed yet ({content.stats_state}); retry later")


def check_stored(
    core: Core,
    checkpoint_id: str,
    texts: Sequence[str],
    *,
    root: str | None = None,
    baseline_id: str | None = None,
    baseline_root: str | None = None,
) -> CheckReport:
    """Rules on a catalogue checkpoint (and baseline): 422 for a malformed rule, 404 for an unknown
    id or root, 409 while either's stats are not done."""
    from . import checkpoints as svc
    from .insights import checkpoint_insights

    rules = prepare(texts, has_baseline=baseline_id is not None)
    _, content = svc.get_checkpoint(core, checkpoint_id)
    root = svc.check_root(content, root)
    base_content = None
    if baseline_id is not None:
        _, base_content = svc.get_checkpoint(core, baseline_id)
        baseline_root = svc.check_root(base_content, baseline_root)
    _ready(content)
    baseline = None
    if base_content is not None:
        _ready(base_content)
        baseline = svc.all_tensors(core, base_content, baseline_root or "")
    tensors = svc.all_tensors(core, content, root)
    chosen_root = root
    return run_rules(rules, tensors, baseline, insights=lambda: checkpoint_insights(core, content, chosen_root))


# --- JUnit XML -------------------------------------------------------------------------------


def junit_xml(report: CheckReport, suite: str = "ckptscope check") -> bytes:
    """The report as JUnit XML: one testcase per rule, a failure with the offenders for each that
    failed. Names are attacker text: escaped by ElementTree, control characters made visible."""
    import xml.etree.ElementTree as ET

    from ckptscope.text import reveal as clean  # XML 1.0 cannot hold control characters, even escaped

    failures = sum(not r.passed for r in report.results)
    root = ET.Element("testsuites", tests=str(len(report.results)), failures=str(failures))
    suite_el = ET.SubElement(
        root, "testsuite", name=clean(suite), tests=str(len(report.results)), failures=str(failures), errors="0"
    )
    for r in report.results:
        case = ET.SubElement(suite_el, "testcase", classname="ckptscope.check", name=clean(r.rule))
        if r.passed:
            ET.SubElement(case, "system-out").text = clean(r.detail)
            continue
        failure = ET.SubElement(case, "failure", message=clean(r.detail), type="RuleFailed")
        lines = [clean(r.detail)]
        if r.offender_count:
            lines.append(f"offenders ({r.offender_count}):")
            lines += [f"  {clean(name)}" for name in r.offenders]
            if r.offender_count > len(r.offenders):
                lines.append(f"  ... and {r.offender_count - len(r.offenders)} more")
        failure.text = "\n".join(lines)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
