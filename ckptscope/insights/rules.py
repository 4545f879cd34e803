"""CI rules: parse ``no-nan``, ``max-abs<=100``, ``changed-only=model.layers.3`` ... and evaluate them
on one checkpoint root's tensors and stats (and a baseline's).

Grammar (whitespace around the parts is ignored)::

    RULE        := CHECK [ "@" PREFIXES ]          the scope: only tensors under these modules
    CHECK       := "no-nan" | "no-inf" | "no-untrained"
                 | "max-abs<=" NUMBER
                 | "params" ("==" | "<=" | ">=") COUNT        COUNT: 7000000, 7_000_000, 7M, 1.5B, 7e9
                 | "dtype==" DTYPE                            bf16, float16, F32, Q4_K ...
                 | "no-findings>=" ("info" | "warning" | "error")
                 | "changed-only=" PREFIXES | "unchanged=" PREFIXES   (need a baseline)
    PREFIXES    := PREFIX { "," PREFIX }            module prefixes: "a.b" and "a.b." both mean a.b

A prefix matches the tensor (or module) of that name and everything inside it, never a sibling
that merely starts with the same letters (``layers.1`` does not match ``layers.10``). The two
baseline rules take their prefixes after ``=`` and no ``@`` scope. A rule that does not parse raises
``RuleError`` (an ``Invalid``: 422 over REST, exit 2 in the CLI).

Each rule gives a ``RuleResult``: passed, a one-line detail and the offending tensor names (at most
``MAX_OFFENDERS`` listed, ``offender_count`` all of them). Rules read the stats only; a tensor
without stats (none computed) cannot pass a value rule and is named as an offender.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from ckptscope.errors import Invalid
from ckptscope.formats.model import DTYPES, SAFETENSORS_DTYPES, TensorInfo
from ckptscope.insights.findings import SEVERITIES  # lowest first
from ckptscope.stats.model import TensorStats

MAX_OFFENDERS = 50  # names listed per result; ``offender_count`` has the total
MAX_RULES = 1000  # rules in one check (a rules file, a REST body)
MAX_RULE_CHARS = 4096

Tensors = Sequence[tuple[TensorInfo, TensorStats | None]]


class RuleError(Invalid):
    default_code = "bad_rule"


class InitLike(Protocol):
    """What the rules read of ``ckptscope.insights.init_verdict.InitVerdict``."""

    @property
    def verdict(self) -> str: ...
    @property
    def matches(self) -> str | None: ...


class FindingLike(Protocol):
    """What the rules read of ``ckptscope.insights.findings.Finding``."""

    @property
    def rule(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def target(self) -> str: ...


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    text: str  # the rule as written (trimmed): what results and reports call it
    check: str  # no-nan, no-inf, max-abs, params, dtype, no-untrained, no-findings, changed-only, unchanged
    op: str | None = None  # "==", "<=", ">=" where the check compares
    value: Any = None  # float (max-abs), int (params), dtype name, severity, or prefixes (tuple)
    scope: tuple[str, ...] = ()  # "@" prefixes; () means every tensor

    @property
    def needs_baseline(self) -> bool:
        return self.check in ("changed-only", "unchanged")


_COUNT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?([kmbgt]?)$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
    "fp32": "float32", "f32": "float32", "float": "float32", "fp64": "float64", "f64": "float64",
    "double": "float64", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
}  # fmt: skip


@lru_cache(maxsize=1)
def _gguf_types() -> frozenset[str]:
    from ckptscope.formats.gguf_format import GGML_TYPES_BY_NAME

    return frozenset(GGML_TYPES_BY_NAME)


_BY_SAFETENSORS = {k.lower(): v.name for k, v in SAFETENSORS_DTYPES.items()}


@lru_cache(maxsize=256)
def dtype_name(text: str) -> str | None:
    """A dtype as a rule or a file spells it -> the torch name (``bfloat16``) or, for a GGUF
    encoding, its upper-case name (``Q4_K``); None when it names no type."""
    low = text.strip().lower()
    if low in DTYPES:
        return low
    if low in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[low]
    if low in _BY_SAFETENSORS:
        return _BY_SAFETENSORS[low]
    up = text.strip().upper()
    return up if up in _gguf_types() else None


def _number(rule: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RuleError(f"rule {rule!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise RuleError(f"rule {rule!r}: the bound must be a finite number >= 0")
    return value


def _count(rule: str, text: str) -> int:
    m = _COUNT.match(text.strip().lower().replace("_", "").replace(",", ""))
    if m is None:
        raise RuleError(f"rule {rule!r}: {text!r} is not a count (e.g. 7000000, 7_000_000, 7M, 1.5B, 7e9)")
    digits, exp, suffix = m.groups()
    value = float(digits) * 10 ** int(exp or 0) * _SCALE[suffix]
    if value != int(value) or value > 10**18:
        raise RuleError(f"rule {rule!r}: {text!r} is not a whole number of parameters")
    return int(value)


def _prefixes(rule: str, text: str) -> tuple[str, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p or p == "." for p in parts):
        raise RuleError(f"rule {rule!r}: needs module prefixes separated by commas (e.g. model.layers.0,lm_head)")
    return tuple(p[:-1] if p.endswith(".") else p for p in parts)


_PLACEHOLDERS = {
    "max-abs": "X",
    "params": "N",
    "dtype": "DTYPE",
    "no-findings": "SEVERITY",
    "changed-only": "PREFIX[,PREFIX] (module prefixes)",
    "unchanged": "PREFIX[,PREFIX] (module prefixes)",
}


def parse_rule(text: str) -> Rule:
    """One rule (see the module docstring); ``RuleError`` when it does not parse."""
    if not isinstance(text, str):
        raise RuleError("a rule is a string")
    rule = text.strip()
    if not rule:
        raise RuleError("empty rule")
    if len(rule) > MAX_RULE_CHARS:
        raise RuleError(f"a rule has at most {MAX_RULE_CHARS} characters")
    check_text, at, scope_text = rule.partition("@")
    check_text = check_text.strip()
    scope = _prefixes(rule, scope_text) if at else ()
    m = re.fullmatch(r"([a-z][a-z-]*)\s*(==|<=|>=|=)?\s*(.*)", check_text, flags=re.S)
    if m is None:
        raise RuleError(f"unknown rule {rule!r}; rules: {RULE_NAMES}")
    name, op, arg = m.group(1), m.group(2), m.group(3).strip()

    def expect(*ops: str | None) -> None:
        if op not in ops or (op is None) != (arg == ""):
            what = _PLACEHOLDERS.get(name, "VALUE")
            shown = " or ".join(f"{name}{o}{what}" if o else name for o in ops)
            raise RuleError(f"rule {rule!r}: write it as {shown}")

    if name in ("no-nan", "no-inf", "no-untrained"):
        expect(None)
        return Rule(rule, name, scope=scope)
    if name == "max-abs":
        expect("<=")
        return Rule(rule, name, "<=", _number(rule, arg), scope)
    if name == "params":
        expect("==", "<=", ">=")
        return Rule(rule, name, op, _count(rule, arg), scope)
    if name == "dtype":
        expect("==")
        dtype = dtype_name(arg)
        if dtype is None or (dtype in DTYPES and DTYPES[dtype].category != "float"):
            raise RuleError(f"rule {rule!r}: {arg!r} is not a floating-point dtype (bf16, f16, f32, Q4_K, ...)")
        return Rule(rule, name, "==", dtype, scope)
    if name == "no-findings":
        expect(">=")
        if arg.lower() not in SEVERITIES:
            raise RuleError(f"rule {rule!r}: the severity is one of {', '.join(SEVERITIES)}")
        return Rule(rule, name, ">=", arg.lower(), scope)
    if name in ("changed-only", "unchanged"):
        expect("=")
        if at:
            raise RuleError(f"rule {rule!r}: {name} takes its prefixes after '=', not an '@' scope")
        return Rule(rule, name, "=", _prefixes(rule, arg))
    raise RuleError(f"unknown rule {rule!r}; rules: {RULE_NAMES}")


RULE_NAMES = (
    "no-nan, no-inf, max-abs<=X, params==N (<=, >=), dtype==DTYPE, no-untrained, no-findings>=SEVERITY, "
    "changed-only=PREFIX[,PREFIX], unchanged=PREFIX[,PREFIX]; any but the last two take @PREFIX[,PREFIX]"
)


def parse_rules(texts: Iterable[str]) -> list[Rule]:
    rules = [parse_rule(t) for t in texts]
    if len(rules) > MAX_RULES:
        raise RuleError(f"at most {MAX_RULES} rules in one check")
    return rules


def rules_file_lines(text: str) -> list[str]:
    """The rules of a rules file: one per line; blank lines and comments (a ``#`` at the start of
    a line or after a space) are skipped."""
    out = []
    for line in text.splitlines():
        body = line.strip()
        if body.startswith("#"):
            continue
        body = re.split(r"\s#", body, maxsplit=1)[0].strip()
        if body:
            out.append(body)
    return out


# --- evaluating ------------------------------------------------------------------------------


def under(name: str, prefix: str) -> bool:
    """``name`` is the module/tensor ``prefix`` or inside it (the meaning of every prefix here)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _in_scope(name: str, scope: tuple[str, ...]) -> bool:
    return not scope or any(under(name, p) for p in scope)


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: str
    passed: bool
    detail: str
    offenders: tuple[str, ...] = ()  # at most MAX_OFFENDERS names
    offender_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "passed": self.passed,
            "detail": self.detail,
            "offenders": list(self.offenders),
            "offender_count": self.offender_count,
        }


def _result(rule: Rule, offenders: Sequence[str], ok_detail: str, bad_detail: str) -> RuleResult:
    names = list(dict.fromkeys(offenders))  # each name once, in order
    if not names:
        return RuleResult(rule.text, True, ok_detail)
    return RuleResult(rule.text, False, bad_detail, tuple(names[:MAX_OFFENDERS]), len(names))


def _noun(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _not_given() -> Any:
    raise LookupError("this check needs init verdicts and findings: give the Subject its insights")


@dataclass(slots=True)
class Subject:
    """What the rules look at: one checkpoint root's tensors with their stats, and where its init
    verdicts (tensor name -> verdict) and findings come from. Those two are asked for on first use
    only (``no-untrained``, ``no-findings``); ``services.check`` gives them from
    ``services.insights``, the one implementation of both."""

    tensors: Tensors
    init: Callable[[], Mapping[str, InitLike]] = _not_given
    findings: Callable[[], Sequence[FindingLike]] = _not_given
    _init: Mapping[str, InitLike] | None = field(default=None, repr=False)
    _findings: Sequence[FindingLike] | None = field(default=None, repr=False)

    def init_verdicts(self) -> Mapping[str, InitLike]:
        if self._init is None:
            self._init = self.init()
        return self._init

    def all_findings(self) -> Sequence[FindingLike]:
        if self._findings is None:
            self._findings = self.findings()
        return self._findings


def _no_stats(rule: Rule, tensors: Tensors) -> list[str]:
    return [t.name for t, s in tensors if s is None and _in_scope(t.name, rule.scope)]


def _scoped(rule: Rule, tensors: Tensors) -> list[tuple[TensorInfo, TensorStats]]:
    return [(t, s) for t, s in tensors if s is not None and _in_scope(t.name, rule.scope)]


def _where(rule: Rule) -> str:
    return f" under {', '.join(rule.scope)}" if rule.scope else ""


def _missing_note(missing: Sequence[str]) -> str:
    return f"; {_noun(len(missing), 'tensor')} without stats" if missing else ""


def _nonfinite(rule: Rule, subject: Subject, attr: str, label: str) -> RuleResult:
    missing = _no_stats(rule, subject.tensors)
    scoped = _scoped(rule, subject.tensors)
    bad = [(t.name, getattr(s, attr)) for t, s in scoped if getattr(s, attr)]
    total = sum(n for _, n in bad)
    return _result(
        rule,
        [n for n, _ in bad] + missing,
        f"no {label} in {_noun(len(scoped), 'tensor')}{_where(rule)}",
        f"{_noun(total, label + ' value')} in {_noun(len(bad), 'tensor')}{_where(rule)}{_missing_note(missing)}",
    )


def _max_abs(rule: Rule, subject: Subject) -> RuleResult:
    bound: float = rule.value
    missing = _no_stats(rule, subject.tensors)
    scoped = _scoped(rule, subject.tensors)
    bad: list[tuple[str, float]] = []
    for t, s in scoped:
        top = math.inf if s.inf else (s.absmax if s.absmax is not None else 0.0)
        if top > bound:
            bad.append((t.name, top))
    bad.sort(key=lambda x: -x[1])
    worst = f"; largest {bad[0][1]:.6g} ({bad[0][0]})" if bad else ""
    largest = max((s.absmax or 0.0 for _, s in scoped), default=0.0)
    return _result(
        rule,
        [n for n, _ in bad] + missing,
        f"largest |x| {largest:.6g} <= {bound:g} in {_noun(len(scoped), 'tensor')}{_where(rule)}",
        f"{_noun(len(bad), 'tensor')}{_where(rule)} exceed |x| <= {bound:g}{worst}{_missing_note(missing)}",
    )


def parameter_count(tensors: Iterable[TensorInfo], scope: tuple[str, ...] = ()) -> int:
    """Elements of the parameters (not buffers), tied tensors once: the tree's ``param_numel``."""
    return sum(t.numel for t in tensors if t.kind == "parameter" and not t.alias_of and _in_scope(t.name, scope))


def _params(rule: Rule, subject: Subject) -> RuleResult:
    n = parameter_count((t for t, _ in subject.tensors), rule.scope)
    want: int = rule.value
    ok = {"==": n == want, "<=": n <= want, ">=": n >= want}[rule.op or "=="]
    detail = f"{n:,} parameters{_where(rule)}; want {rule.op} {want:,}"
    return RuleResult(rule.text, ok, detail)


def _is_floating(t: TensorInfo) -> bool:
    return t.encoding is not None or (
        t.quant is None and (d := DTYPES.get(t.dtype)) is not None and d.category == "float"
    )


def _dtype(rule: Rule, subject: Subject) -> RuleResult:
    want: str = rule.value
    checked = [t for t, _ in subject.tensors if _is_floating(t) and _in_scope(t.name, rule.scope)]
    bad = [t for t in checked if dtype_name(t.shown_dtype) != want]
    found: dict[str, int] = {}
    for t in bad:
        found[t.shown_dtype] = found.get(t.shown_dtype, 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]))
    return _result(
        rule,
        [t.name for t in bad],
        f"{_noun(len(checked), 'floating-point tensor')}{_where(rule)}, all {want}",
        f"{_noun(len(bad), 'floating-point tensor')}{_where(rule)} not {want} ({mix})",
    )


def _no_untrained(rule: Rule, subject: Subject) -> RuleResult:
    verdicts = subject.init_verdicts()
    scoped = [t for t, _ in subject.tensors if t.kind == "parameter" and _in_scope(t.name, rule.scope)]
    bad = [t.name for t in scoped if (v := verdicts.get(t.name)) is not None and v.verdict == "init"]
    first = verdicts[bad[0]].matches if bad else None
    like = f"; e.g. {bad[0]} looks like {first}" if first else ""
    return _result(
        rule,
        bad,
        f"no parameter{_where(rule)} looks like its initialisation ({_noun(len(scoped), 'parameter tensor')})",
        f"{_noun(len(bad), 'parameter tensor')}{_where(rule)} still look like their initialisation{like}",
    )


def _no_findings(rule: Rule, subject: Subject) -> RuleResult:
    floor = SEVERITIES.index(rule.value)
    hits = [
        f
        for f in subject.all_findings()
        if f.severity in SEVERITIES and SEVERITIES.index(f.severity) >= floor and _in_scope(f.target, rule.scope)
    ]
    by_rule: dict[str, int] = {}
    for f in hits:
        by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(by_rule.items(), key=lambda kv: (-kv[1], kv[0])))
    return _result(
        rule,
        [f.target for f in hits],
        f"no findings of severity {rule.value} or above{_where(rule)}",
        f"{_noun(len(hits), 'finding')} of severity {rule.value} or above{_where(rule)} ({kinds})",
    )


def _digests(tensors: Tensors) -> dict[str, str | None]:
    return {t.name: (s.digest if s is not None else None) for t, s in tensors}


def changed_names(subject: Tensors, baseline: Tensors) -> tuple[list[str], list[str]]:
    """(names whose content differs from the baseline's or exists on one side only, names whose
    digest is unknown on either side), in the subject's order then the baseline's."""
    mine, theirs = _digests(subject), _digests(baseline)
    changed: list[str] = []
    unknown: list[str] = []
    for name in [*mine, *(n for n in theirs if n not in mine)]:
        if name not in mine or name not in theirs:
            changed.append(name)
        elif mine[name] is None or theirs[name] is None:
            unknown.append(name)
        elif mine[name] != theirs[name]:
            changed.append(name)
    return changed, unknown


def _against_baseline(rule: Rule, subject: Subject, baseline: Tensors) -> RuleResult:
    prefixes: tuple[str, ...] = rule.value
    changed, unknown = changed_names(subject.tensors, baseline)
    mine = {t.name for t, _ in subject.tensors}
    theirs = {t.name for t, _ in baseline}

    def how(name: str) -> str:
        return name if name in mine and name in theirs else f"{name} ({'added' if name in mine else 'removed'})"

    listed = ", ".join(prefixes)
    if rule.check == "changed-only":
        outside = [n for n in changed + unknown if not _in_scope(n, prefixes)]
        inside = [n for n in changed if _in_scope(n, prefixes)]
        unknown_out = [n for n in unknown if not _in_scope(n, prefixes)]
        note = f"; {_noun(len(unknown_out), 'tensor')} without a digest" if unknown_out else ""
        return _result(
            rule,
            [how(n) for n in outside],
            f"{_noun(len(inside), 'tensor')} changed, all under {listed}",
            f"{_noun(len(outside) - len(unknown_out), 'tensor')} changed outside {listed}{note}",
        )
    scoped = [n for n in [*mine, *(n for n in theirs if n not in mine)] if _in_scope(n, prefixes)]
    bad = [n for n in changed + unknown if _in_scope(n, prefixes)]
    unknown_in = [n for n in unknown if _in_scope(n, prefixes)]
    note = f"; {_noun(len(unknown_in), 'tensor')} without a digest" if unknown_in else ""
    if not scoped:
        return RuleResult(rule.text, False, f"no tensor under {listed} in either checkpoint")
    return _result(
        rule,
        [how(n) for n in bad],
        f"{_noun(len(scoped), 'tensor')} under {listed} identical to the baseline",
        f"{_noun(len(bad) - len(unknown_in), 'tensor')} under {listed} differ from the baseline{note}",
    )


_EVALUATORS: dict[str, Callable[[Rule, Subject], RuleResult]] = {
    "no-nan": lambda r, s: _nonfinite(r, s, "nan", "NaN"),
    "no-inf": lambda r, s: _nonfinite(r, s, "inf", "Inf"),
    "max-abs": _max_abs,
    "params": _params,
    "dtype": _dtype,
    "no-untrained": _no_untrained,
    "no-findings": _no_findings,
}


def evaluate(rule: Rule, subject: Subject, baseline: Tensors | None = None) -> RuleResult:
    if rule.needs_baseline:
        if baseline is None:
            return RuleResult(rule.text, False, f"{rule.check} needs a baseline checkpoint to compare with")
        return _against_baseline(rule, subject, baseline)
    return _EVALUATORS[rule.check](rule, subject)


def evaluate_all(rules: Sequence[Rule], subject: Subject, baseline: Tensors | None = None) -> list[RuleResult]:
    return [evaluate(rule, subject, baseline) for rule in rules]
