"""The insights glue on a real producer's file: a tiny transformers Llama saved with safetensors,
with one layer's weight scaled by 100, one holding NaNs and one zeroed -> exactly those findings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptscope.formats import open_checkpoint
from ckptscope.insights.findings import Thresholds
from ckptscope.services.insights import analyse, decorate_tree
from ckptscope.stats import build_tree
from ckptscope.stats.engine import compute_stats

SCALED = "model.layers.1.mlp.up_proj.weight"
NAN = "model.layers.2.self_attn.o_proj.weight"
ZEROED = "model.layers.3.mlp.down_proj.weight"
EXPECTED = {(SCALED, "variance-exploding"), (NAN, "nan-inf"), (ZEROED, "dead")}


def broken_llama(directory: Path) -> Path:
    """A fresh tiny Llama (its own ``_init_weights``) saved by ``save_pretrained`` (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        layers = model.model.layers
        layers[1].mlp.up_proj.weight.mul_(100)
        layers[2].self_attn.o_proj.weight[0, :5] = float("nan")
        layers[3].mlp.down_proj.weight.zero_()
    model.save_pretrained(directory, safe_serialization=True)
    return directory / "model.safetensors"


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory) -> Path:
    return broken_llama(tmp_path_factory.mktemp("llama"))


def _pairs(path: Path):
    tensors = open_checkpoint(path).root_tensors()
    stats = compute_stats(tensors)
    return tensors, [(t, stats.get(t.name)) for t in tensors]


def test_exactly_the_broken_tensors_are_found(llama_file):
    tensors, pairs = _pairs(llama_file)
    insights = analyse(pairs)
    assert {(f.target, f.rule) for f in insights.findings} == EXPECTED
    by = {f.target: f for f in insights.findings}
    assert by[NAN].severity == "error" and by[NAN].values["nan"] == 5
    assert by[SCALED].values["ratio"] == pytest.approx(100, rel=0.05)
    assert by[ZEROED].values["zeros"] == 64 * 128
    json.dumps([f.to_json() for f in insights.findings], allow_nan=False)
    # an init verdict for every tensor
    assert set(insights.init) == {t.name for t in tensors}
    # roll-ups: the root and the modules on the way to each finding
    assert insights.modules[""].findings == {"info": 0, "warning": 2, "error": 1}
    assert insights.modules["model.layers.2"].findings == {"info": 0, "warning": 0, "error": 1}
    assert insights.modules["model.layers.0"].findings == {"info": 0, "warning": 0, "error": 0}
    assert insights.modules["model.layers"].findings["warning"] == 2
    assert SCALED not in insights.modules  # modules only, not tensors

    tree = decorate_tree(build_tree(tensors).to_json(), insights)
    assert tree["findings"] == insights.modules[""].findings
    layers = next(
        c for c in next(c for c in tree["children"] if c["name"] == "model")["children"] if c["name"] == "layers"
    )
    layer3 = next(c for c in layers["children"] if c["name"] == "3")
    assert layer3["findings"]["warning"] == 1
    down = next(
        c for c in next(c for c in layer3["children"] if c["name"] == "mlp")["children"] if c["name"] == "down_proj"
    )
    assert down["children"][0]["findings"] == {"info": 0, "warning": 1, "error": 0}  # the tensor itself


def test_a_clean_model_has_no_findings_and_thresholds_apply(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    _, pairs = _pairs(tmp_path / "model.safetensors")
    assert analyse(pairs).findings == []
    # a strict norm-outlier threshold flags the ordinary spread of a fresh init
    strict = analyse(pairs, Thresholds(norm_z=0.01, norm_min_spread=0.001))
    assert strict.findings and {f.rule for f in strict.findings} == {"norm-outlier"}
    assert strict.thresholds.norm_z == 0.01


def test_pending_stats_give_verdicts_but_no_value_findings(llama_file):
    tensors = open_checkpoint(llama_file).root_tensors()
    insights = analyse([(t, None) for t in tensors])
    assert insights.findings == [] and set(insights.init) == {t.name for t in tensors}
    assert insights.modules[""].findings == {"info": 0, "warning": 0, "error": 0}


def test_a_spike_from_the_real_engine(tmp_path):
    from tests import factories as f

    torch.manual_seed(2)
    spiky = torch.randn(100, 100)
    spiky[3, 7] = 1000.0
    path = f.save_safetensors({"spiky": spiky, "calm": torch.randn(100, 100)}, tmp_path / "s.safetensors")
    _, pairs = _pairs(path)
    if pairs[0][1].percentiles is None:
        pytest.skip("the stats engine computes no percentiles yet")
    found = analyse(pairs).findings
    assert [(x.target, x.rule) for x in found] == [("spiky", "spike")]
    assert found[0].values["absmax"] == 1000.0 and found[0].values["ratio"] > 200


def test_tied_tensors_are_checked_once(tmp_path):
    from tests import factories as f

    shared = torch.zeros(8, 8)
    path = f.save_torch({"embed.weight": shared, "head.weight": shared, "other": torch.randn(8, 8)}, tmp_path / "t.pt")
    tensors, pairs = _pairs(path)
    assert [t.alias_of for t in tensors] == [None, "embed.weight", None]
    insights = analyse(pairs)
    assert [(x.target, x.rule) for x in insights.findings] == [("embed.weight", "dead")]
    assert set(insights.init) == {"embed.weight", "head.weight", "other"}


def test_a_fresh_layer_among_trained_ones(tmp_path):
    """A few AdamW steps move every weight off its init (H1's verdict: "trained"); layer 2 is then
    replaced by a fresh init: its tensors and the layer itself are found, nothing else is untrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 16))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.model.layers[2].load_state_dict(LlamaForCausalLM(config).model.layers[2].state_dict())
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors, pairs = _pairs(tmp_path / "model.safetensors")
    insights = analyse(pairs)
    untrained = [f for f in insights.findings if f.rule == "untrained-among-trained"]
    layer2 = {t.name for t in tensors if t.name.startswith("model.layers.2.")}
    assert {f.target for f in untrained if f.level == "tensor"} == layer2
    [module] = [f for f in untrained if f.level == "module"]
    assert module.target == "model.layers.2" and module.values == {"tensors": 9, "trained_siblings": 3, "siblings": 3}
    assert insights.modules["model.layers.2"].untrained == insights.modules["model.layers.2"].layers == 9
    assert insights.modules["model.layers"].untrained == 9 and insights.modules["model.layers"].layers == 36
    assert {f.rule for f in insights.findings} <= {"untrained-among-trained", "norm-outlier"}
    assert all(f.target.startswith("model.layers.2") for f in insights.findings)
