"""The findings rules on hand-built facts: each fires past its threshold and not before it."""

from __future__ import annotations

import json

import pytest

from ckptscope.insights.findings import (
    SEVERITIES,
    Finding,
    TensorFacts,
    Thresholds,
    find,
    load_thresholds,
    role,
)
from ckptscope.insights.init_verdict import InitVerdict
from ckptscope.stats.model import TensorStats


def stats(numel=1000, std=1.0, l2=None, absmax=3.0, zeros=0, nan=0, inf=0, p=None) -> TensorStats:
    return TensorStats(
        numel=numel,
        mean=0.0,
        std=std,
        min=-absmax,
        max=absmax,
        l2=l2 if l2 is not None or std is None else std * numel**0.5,
        absmax=absmax,
        zeros=zeros,
        nan=nan,
        inf=inf,
        percentiles=p,
    )


def fact(name, s, shape=(10, 100), kind="parameter", init=None) -> TensorFacts:
    return TensorFacts(name, shape, "float32", kind, s, init)


def rules(found: list[Finding]) -> list[tuple[str, str]]:
    return [(f.rule, f.target) for f in found]


def layers(n: int, make, name="model.layers.{}.mlp.up_proj.weight") -> list[TensorFacts]:
    return [make(i, name.format(i)) for i in range(n)]


def test_role_replaces_numeric_path_components_only():
    assert role("model.layers.3.mlp.up_proj.weight") == "model.layers.N.mlp.up_proj.weight"
    assert role("h.10.experts.7.w1") == "h.N.experts.N.w1"
    assert role("layer1.conv2.weight") == "layer1.conv2.weight"
    assert role("0.weight") == "N.weight"


def test_clean_tensors_give_no_findings():
    facts = layers(6, lambda i, n: fact(n, stats(std=1.0 + 0.01 * i, p={"0.1": -3.0, "99.9": 3.1})))
    assert find(facts) == []


def test_nan_inf_is_an_error_on_any_tensor_kind():
    found = find(
        [fact("a", stats(nan=2, inf=1)), fact("b.running_var", stats(nan=1), kind="buffer"), fact("c", stats())]
    )
    assert rules(found) == [("nan-inf", "a"), ("nan-inf", "b.running_var")]
    f = found[0]
    assert f.severity == "error" and f.level == "tensor" and f.values == {"nan": 2, "inf": 1, "numel": 1000}
    assert f.threshold == 0
    out = f.to_json()
    assert set(out) == {"rule", "severity", "target", "level", "message", "values", "threshold"}
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(("absmax", "fires"), [(59.0, False), (61.0, True)])
def test_spike_around_its_threshold(absmax, fires):
    # bulk edge max(|p0.1|, |p99.9|) = 3.0; default ratio 20 -> 60
    s = stats(absmax=absmax, p={"0.1": -3.0, "99.9": 2.5})
    found = find([fact("w", s)])
    assert rules(found) == ([("spike", "w")] if fires else [])
    if fires:
        assert found[0].values["ratio"] == pytest.approx(absmax / 3.0, rel=1e-5)
        assert found[0].threshold == 20.0 and found[0].severity == "warning"


def test_spike_needs_percentiles_and_a_nonzero_bulk():
    assert find([fact("w", stats(absmax=1e6, p=None))]) == []  # older stats: no percentiles
    assert find([fact("w", stats(absmax=1e6, zeros=10, p={"0.1": 0.0, "99.9": 0.0}))]) == []


def test_spike_threshold_is_configurable():
    s = stats(absmax=10.0, p={"0.1": -1.0, "99.9": 1.0})
    assert find([fact("w", s)]) == []
    assert rules(find([fact("w", s)], Thresholds(spike_ratio=9.5))) == [("spike", "w")]


def test_dead_and_near_zero():
    t = Thresholds()
    dead = find([fact("m", stats(zeros=1000, std=0.0, l2=0.0, absmax=0.0))])
    assert rules(dead) == [("dead", "m")] and dead[0].severity == "warning"
    bias = find([fact("b", stats(numel=10, zeros=10, std=0.0, l2=0.0, absmax=0.0), shape=(10,))])
    assert rules(bias) == [("dead", "b")] and bias[0].severity == "info"
    at = int(t.near_zero_fraction * 1000)  # 950 zeros: not above 0.95
    assert find([fact("w", stats(zeros=at))]) == []
    near = find([fact("w", stats(zeros=at + 1))])
    assert rules(near) == [("near-zero", "w")]
    assert near[0].values["zero_fraction"] == pytest.approx(0.951) and near[0].threshold == 0.95


def test_value_rules_skip_buffers():
    buf = fact("bn.num_batches_tracked", stats(numel=1, zeros=1, std=None, absmax=0.0), shape=(), kind="buffer")
    assert find([buf]) == []


@pytest.mark.parametrize(
    ("factor", "rule"), [(9.9, None), (10.1, "variance-exploding"), (0.101, None), (0.099, "variance-collapsed")]
)
def test_variance_against_siblings_around_thresholds(factor, rule):
    facts = layers(5, lambda i, n: fact(n, stats(std=factor if i == 2 else 1.0)))
    found = [f for f in find(facts) if f.rule.startswith("variance")]
    assert rules(found) == ([(rule, "model.layers.2.mlp.up_proj.weight")] if rule else [])
    if rule:
        assert found[0].values["median_std"] == 1.0 and found[0].values["group"] == 5


def test_variance_needs_same_role_and_shape_and_enough_siblings():
    # other shape: not a sibling
    facts = layers(4, lambda i, n: fact(n, stats(std=100.0 if i == 0 else 1.0), shape=(10, 100) if i else (100, 10)))
    assert [f for f in find(facts) if f.rule.startswith("variance")] == []
    # two siblings only (min_siblings 3)
    facts = layers(2, lambda i, n: fact(n, stats(std=100.0 if i == 0 else 1.0)))
    assert find(facts) == []
    # a name without a numbered part has no siblings
    assert find([fact("head.weight", stats(std=100.0)), fact("tail.weight", stats())]) == []


def test_dead_siblings_do_not_also_collapse():
    facts = layers(4, lambda i, n: fact(n, stats(zeros=1000, std=0.0, l2=0.0, absmax=0.0) if i == 1 else stats()))
    assert rules(find(facts)) == [("dead", "model.layers.1.mlp.up_proj.weight")]


def test_norm_outlier_uses_a_robust_spread():
    t = Thresholds()
    # norms tightly spread: the floor norm_min_spread (0.1 in log) rules; 5 of it = factor e^0.5 = 1.65
    base = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    below = layers(7, lambda i, n: fact(n, stats(l2=1.6 if i == 6 else base[i])))
    assert find(below, t) == []
    above = layers(7, lambda i, n: fact(n, stats(l2=1.7 if i == 6 else base[i])))
    found = find(above, t)
    assert rules(found) == [("norm-outlier", "model.layers.6.mlp.up_proj.weight")]
    assert found[0].values["z"] > 5 and found[0].threshold == 5.0
    # widely spread siblings: the same 1.7x is ordinary
    wide = [1.0, 2.0, 0.5, 1.5, 0.7, 1.2]
    assert find(layers(7, lambda i, n: fact(n, stats(l2=1.7 if i == 6 else wide[i]))), t) == []


def test_norm_outlier_not_repeated_where_variance_fired():
    facts = layers(5, lambda i, n: fact(n, stats(std=100.0 if i == 0 else 1.0)))
    assert rules(find(facts)) == [("variance-exploding", "model.layers.0.mlp.up_proj.weight")]


def _verdicts(pattern: str):
    names = {"i": "init", "t": "trained", "u": "unknown"}
    return lambda i, n: fact(n, stats(), init=InitVerdict(names[pattern[i]], "normal_(0, 0.02)", 0.01))


@pytest.mark.parametrize(
    ("pattern", "flagged"),
    [
        ("ttti", [3]),  # 3 of 3 siblings trained
        ("ttii", [2, 3]),  # each init one: 2 of 3 siblings trained, more than half
        ("tiii", []),  # 1 of 3
        ("iiii", []),  # a fresh model: nothing is "among trained"
        ("tuui", []),  # unknowns do not count: 2 tensors with a verdict, fewer than min_siblings
        ("ttui", [3]),  # 2 of 2 siblings with a verdict trained
    ],
)
def test_untrained_among_trained(pattern, flagged):
    found = [f for f in find(layers(len(pattern), _verdicts(pattern))) if f.level == "tensor"]
    assert rules(found) == [("untrained-among-trained", f"model.layers.{i}.mlp.up_proj.weight") for i in flagged]
    if found:
        assert found[0].values["matches"] == "normal_(0, 0.02)" and found[0].threshold == 0.5


def test_untrained_majority_threshold():
    facts = layers(4, _verdicts("ttii"))  # each init tensor: 2 of 3 siblings trained (0.667)
    assert len([f for f in find(facts, Thresholds(untrained_majority=0.66)) if f.level == "tensor"]) == 2
    assert [f for f in find(facts, Thresholds(untrained_majority=0.67)) if f.level == "tensor"] == []


def test_a_whole_untrained_layer_is_a_module_finding():
    facts = []
    for layer in range(4):
        for part in ("q_proj", "k_proj"):
            v = "init" if layer == 2 else "trained"
            facts.append(fact(f"model.layers.{layer}.attn.{part}.weight", stats(), init=InitVerdict(v, "x", 0.0)))
    found = find(facts)
    module = [f for f in found if f.level == "module"]
    assert rules(module) == [("untrained-among-trained", "model.layers.2")]
    assert module[0].values == {"tensors": 2, "trained_siblings": 3, "siblings": 3}
    assert {f.target for f in found if f.level == "tensor"} == {
        "model.layers.2.attn.q_proj.weight",
        "model.layers.2.attn.k_proj.weight",
    }
    # 3 of 4 layers untrained: 1 of 3 siblings trained is not most of them
    facts3 = [
        fact(
            f"model.layers.{layer}.attn.q_proj.weight",
            stats(),
            init=InitVerdict("init" if layer else "trained", "x", 0.0),
        )
        for layer in range(4)
    ]
    assert [f for f in find(facts3) if f.level == "module"] == []


def test_thresholds_from_mapping_and_file(tmp_path):
    t = Thresholds.from_mapping({"spike_ratio": 5, "min_siblings": 4})
    assert t.spike_ratio == 5.0 and isinstance(t.spike_ratio, float) and t.min_siblings == 4
    assert t.variance_exploding == Thresholds().variance_exploding
    for bad in ({"nope": 1}, {"spike_ratio": "5"}, {"spike_ratio": -1}, {"min_siblings": 2.5}, {"spike_ratio": True}):
        with pytest.raises(ValueError):
            Thresholds.from_mapping(bad)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"near_zero_fraction": 0.5}))
    assert load_thresholds(path).near_zero_fraction == 0.5
    path.write_text("[1]")
    with pytest.raises(ValueError, match="object"):
        load_thresholds(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_thresholds(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_thresholds(tmp_path / "missing.json")
    assert set(Thresholds().to_json()) == {
        "spike_ratio", "variance_exploding", "variance_collapsed", "near_zero_fraction", "norm_z",
        "norm_min_spread", "untrained_majority", "min_siblings", "sibling_min_ndim",
    }  # fmt: skip


def test_severities_are_known():
    facts = [fact("a", stats(nan=1)), fact("b", stats(zeros=1000, std=0.0, l2=0.0, absmax=0.0))]
    assert {f.severity for f in find(facts)} <= set(SEVERITIES)


def test_overflowing_ratios_stay_json():
    s = stats(absmax=1e300, p={"0.1": -1e-300, "99.9": 1e-300})
    [found] = find([fact("w", s)])
    assert found.rule == "spike" and found.values["ratio"] is None
    json.dumps(found.to_json(), allow_nan=False)
