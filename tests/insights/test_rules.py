"""CI rules: parsing (and its refusals) and every rule passing and failing on constructed stats."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ckptscope.formats.model import StorageRef, TensorInfo
from ckptscope.insights.rules import (
    MAX_OFFENDERS,
    Rule,
    RuleError,
    Subject,
    dtype_name,
    evaluate,
    parse_rule,
    parse_rules,
    rules_file_lines,
)
from ckptscope.stats.model import TensorStats

REF = StorageRef("/nonexistent", 0, 0, "0")


def info(name: str, shape: tuple[int, ...] = (4, 4), dtype: str = "float32", **kw) -> TensorInfo:
    stride = tuple(int(__import__("math").prod(shape[i + 1 :])) for i in range(len(shape)))
    return TensorInfo(name, dtype, shape, stride, 0, REF, **kw)


def stats(
    numel: int = 16, *, absmax: float = 1.0, nan: int = 0, inf: int = 0, digest: str | None = None
) -> TensorStats:
    return TensorStats(
        numel, mean=0.0, std=0.5, min=-absmax, max=absmax, absmax=absmax, nan=nan, inf=inf, digest=digest
    )


def subject(*pairs: tuple[TensorInfo, TensorStats | None], **kw) -> Subject:
    return Subject(list(pairs), **kw)


def run(rule: str, subj: Subject, baseline=None):
    return evaluate(parse_rule(rule), subj, baseline)


# --- parsing ---------------------------------------------------------------------------------


def test_parse_every_rule_form():
    assert parse_rule("no-nan") == Rule("no-nan", "no-nan")
    assert parse_rule(" max-abs <= 1e3 ") == Rule("max-abs <= 1e3", "max-abs", "<=", 1000.0)
    assert parse_rule("params==7M").value == 7_000_000
    assert parse_rule("params>=1.5B").value == 1_500_000_000
    assert parse_rule("params<=7_000_000").op == "<="
    assert parse_rule("params==7e9").value == 7 * 10**9
    assert parse_rule("dtype==bf16@model.layers., lm_head") == Rule(
        "dtype==bf16@model.layers., lm_head", "dtype", "==", "bfloat16", ("model.layers", "lm_head")
    )
    assert parse_rule("dtype==Q4_K").value == "Q4_K"
    assert parse_rule("no-findings>=Warning").value == "warning"
    r = parse_rule("changed-only=model.layers.3.,lm_head")
    assert r.value == ("model.layers.3", "lm_head") and r.needs_baseline and r.scope == ()
    assert parse_rule("unchanged=model.embed_tokens").needs_baseline
    assert parse_rule("no-untrained@model.layers").scope == ("model.layers",)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("no-nans", "unknown rule"),
        ("no-nan=3", "write it as no-nan"),
        ("max-abs>=3", "max-abs<=X"),
        ("max-abs<=abc", "not a number"),
        ("max-abs<=nan", "finite"),
        ("max-abs<=-1", ">= 0"),
        ("params=5", "params==N or params<=N"),
        ("params==5.5", "whole number"),
        ("params==lots", "not a count"),
        ("dtype==int8", "floating-point dtype"),
        ("dtype==bf61", "floating-point dtype"),
        ("no-findings>=fatal", "severity"),
        ("no-findings", "no-findings>=SEVERITY"),
        ("changed-only=", "prefixes"),
        ("changed-only=a,,b", "prefixes"),
        ("unchanged=a@b", "not an '@' scope"),
        ("no-nan@", "prefixes"),
        ("DROP TABLE", "unknown rule"),
    ],
)
def test_malformed_rules_are_refused_clearly(text, fragment):
    with pytest.raises(RuleError) as caught:
        parse_rule(text)
    assert fragment in str(caught.value)
    assert caught.value.status == 422 and caught.value.code == "bad_rule"


def test_rules_file_comments_and_blank_lines():
    text = "# the gate\n\nno-nan\n  max-abs<=100   # generous\ndtype==bf16@a#b\n"
    assert rules_file_lines(text) == ["no-nan", "max-abs<=100", "dtype==bf16@a#b"]
    assert [r.check for r in parse_rules(rules_file_lines(text))] == ["no-nan", "max-abs", "dtype"]


def test_dtype_names():
    assert dtype_name("BF16") == dtype_name("bf16") == dtype_name("bfloat16") == "bfloat16"
    assert dtype_name("fp32") == dtype_name("F32") == "float32"
    assert dtype_name("q8_0") == "Q8_0"
    assert dtype_name("nope") is None


# --- evaluating ------------------------------------------------------------------------------


def test_no_nan_and_no_inf_name_their_offenders():
    subj = subject(
        (info("a.weight"), stats(nan=3)),
        (info("b.weight"), stats(inf=1)),
        (info("c.weight"), stats()),
    )
    r = run("no-nan", subj)
    assert not r.passed and r.offenders == ("a.weight",) and r.offender_count == 1 and "3 NaN values" in r.detail
    r = run("no-inf", subj)
    assert not r.passed and r.offenders == ("b.weight",)
    assert run("no-nan@b,c", subj).passed
    assert run("no-inf@a", subj).passed
    clean = subject((info("c.weight"), stats()))
    assert run("no-nan", clean).passed and run("no-inf", clean).passed


def test_a_tensor_without_stats_cannot_pass_a_value_rule():
    r = run("no-nan", subject((info("a"), None), (info("b"), stats())))
    assert not r.passed and r.offenders == ("a",) and "without stats" in r.detail


def test_max_abs():
    subj = subject((info("small"), stats(absmax=0.5)), (info("big"), stats(absmax=250.0)), (info("inf"), stats(inf=2)))
    r = run("max-abs<=100", subj)
    assert not r.passed and set(r.offenders) == {"big", "inf"} and r.offenders[0] == "inf"  # worst first
    assert run("max-abs<=100@small", subj).passed
    assert not run("max-abs<=0.1@small", subj).passed
    assert run("max-abs<=1000@small,big", subj).passed


def test_prefixes_match_modules_not_siblings_with_the_same_letters():
    subj = subject((info("layers.1.w"), stats()), (info("layers.10.w"), stats(nan=1)))
    assert run("no-nan@layers.1", subj).passed
    assert not run("no-nan@layers.10.", subj).passed


def test_params_counts_parameters_once_not_buffers():
    subj = subject(
        (info("embed.weight", (10, 4)), stats(40)),
        (info("lm_head.weight", (10, 4), alias_of="embed.weight"), stats(40)),
        (info("norm.running_mean", (4,), kind="buffer"), stats(4)),
        (info("head.bias", (4,)), stats(4)),
    )
    assert run("params==44", subj).passed
    r = run("params==45", subj)
    assert not r.passed and "44 parameters" in r.detail and r.offenders == ()
    assert run("params<=44", subj).passed and not run("params<=43", subj).passed
    assert run("params>=44", subj).passed and not run("params>=1K", subj).passed
    assert run("params==4@head", subj).passed


def test_dtype_checks_floating_tensors_only():
    subj = subject(
        (info("model.layers.0.w", dtype="bfloat16"), stats()),
        (info("model.layers.1.w", dtype="float32"), stats()),
        (info("model.norm.w", dtype="float32"), stats()),
        (info("model.steps", (1,), dtype="int64"), stats(1)),  # a counter: not a precision question
    )
    r = run("dtype==bf16", subj)
    assert not r.passed and r.offenders == ("model.layers.1.w", "model.norm.w") and "float32 2" in r.detail
    r = run("dtype==bf16@model.layers", subj)
    assert not r.passed and r.offenders == ("model.layers.1.w",)
    assert run("dtype==bf16@model.layers.0", subj).passed
    assert run("dtype==f32@model.norm", subj).passed


def test_gguf_encoded_tensors_are_checked_by_their_file_type():
    subj = subject(
        (info("blk.0.attn_q.weight", encoding="Q4_K", file_dtype="Q4_K"), stats()),
        (info("blk.0.norm.weight", file_dtype="F32"), stats()),
    )
    assert run("dtype==Q4_K@blk.0.attn_q", subj).passed
    assert run("dtype==f32@blk.0.norm", subj).passed
    r = run("dtype==Q8_0", subj)
    assert not r.passed and r.offender_count == 2


@dataclass
class Verdict:
    verdict: str
    matches: str | None = None


@dataclass
class Found:
    rule: str
    severity: str
    target: str


def test_no_untrained_uses_the_init_verdicts():
    subj = subject(
        (info("layers.0.w"), stats()),
        (info("layers.1.w"), stats()),
        (info("layers.1.running_var", kind="buffer"), stats()),
        init=lambda: {
            "layers.0.w": Verdict("trained"),
            "layers.1.w": Verdict("init", "normal_(0, 0.02)"),
            "layers.1.running_var": Verdict("init", "ones"),  # a buffer: not trained by backprop
        },
    )
    r = run("no-untrained", subj)
    assert not r.passed and r.offenders == ("layers.1.w",) and "normal_(0, 0.02)" in r.detail
    assert run("no-untrained@layers.0", subj).passed


def test_no_findings_at_or_above_a_severity():
    findings = [
        Found("spike", "warning", "layers.0.w"),
        Found("nan_inf", "error", "layers.1.w"),
        Found("x", "info", ""),
    ]
    subj = subject((info("layers.0.w"), stats()), findings=lambda: findings)
    r = run("no-findings>=warning", subj)
    assert not r.passed and r.offenders == ("layers.0.w", "layers.1.w") and "nan_inf 1" in r.detail
    r = run("no-findings>=error", subj)
    assert not r.passed and r.offenders == ("layers.1.w",)
    assert not run("no-findings>=info", subj).passed
    assert run("no-findings>=warning@layers.2", subj).passed
    assert run("no-findings>=error", subject(findings=lambda: findings[:1])).passed


def test_insights_are_asked_for_once_and_only_when_needed():
    calls = []

    def init():
        calls.append(1)
        return {}

    subj = subject((info("a"), stats()), init=init)
    run("no-nan", subj)
    assert calls == []
    run("no-untrained", subj)
    run("no-untrained@a", subj)
    assert calls == [1]


def _pair(name: str, digest: str | None, shape: tuple[int, ...] = (4, 4)):
    return info(name, shape), stats(digest=digest)


BASE = [
    _pair("embed.w", "xxh3-128:" + "1" * 32),
    _pair("layers.0.w", "xxh3-128:" + "2" * 32),
    _pair("head.w", "xxh3-128:" + "3" * 32),
]


def test_changed_only_and_unchanged_by_digest():
    tuned = [BASE[0], _pair("layers.0.w", "xxh3-128:" + "9" * 32), BASE[2]]
    subj = subject(*tuned)
    assert run("changed-only=layers.0", subj, BASE).passed
    assert run("changed-only=layers,head", subj, BASE).passed
    r = run("changed-only=head", subj, BASE)
    assert not r.passed and r.offenders == ("layers.0.w",) and "outside head" in r.detail
    assert run("unchanged=embed,head", subj, BASE).passed
    r = run("unchanged=layers", subj, BASE)
    assert not r.passed and r.offenders == ("layers.0.w",)
    assert run("changed-only=head", subject(*BASE), BASE).passed  # nothing changed at all


def test_added_removed_and_unknown_digests_are_changes():
    subj = subject(BASE[0], BASE[1], _pair("extra.w", "xxh3-128:" + "4" * 32))  # head.w removed, extra.w added
    r = run("changed-only=layers", subj, BASE)
    assert not r.passed and set(r.offenders) == {"extra.w (added)", "head.w (removed)"}
    r = run("unchanged=head", subj, BASE)
    assert not r.passed and r.offenders == ("head.w (removed)",)
    unknown = subject(_pair("embed.w", None), BASE[1], BASE[2])
    r = run("unchanged=embed", unknown, BASE)
    assert not r.passed and r.offenders == ("embed.w",) and "without a digest" in r.detail
    r = run("unchanged=nothing.here", subject(*BASE), BASE)
    assert not r.passed and "no tensor under" in r.detail


def test_baseline_rule_without_baseline_fails():
    r = run("unchanged=embed", subject(*BASE))
    assert not r.passed and "baseline" in r.detail


def test_offender_list_is_bounded_with_a_full_count():
    many = [(info(f"layers.{i}.w"), stats(nan=1)) for i in range(MAX_OFFENDERS + 25)]
    r = run("no-nan", subject(*many))
    assert len(r.offenders) == MAX_OFFENDERS and r.offender_count == MAX_OFFENDERS + 25
    assert r.to_json() == {
        "rule": "no-nan",
        "passed": False,
        "detail": r.detail,
        "offenders": list(r.offenders),
        "offender_count": MAX_OFFENDERS + 25,
    }
