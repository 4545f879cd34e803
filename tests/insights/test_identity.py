"""Module digests (``ckptscope.insights.identity``): the documented definition recomputed by hand,
relative-name identity, unknown members, and the same digests from real files of several formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.insights.identity import MODULE_DOMAIN, module_digests, module_identities, moved_modules
from ckptscope.stats.digest import tensor_digest
from ckptscope.stats.engine import compute_stats

D1, D2, D3 = (f"xxh3-128:{c * 32}" for c in "123")


def by_hand(entries: list[list[str]]) -> str:
    """The docstring's definition, written out independently of the implementation."""
    text = json.dumps(sorted(entries), ensure_ascii=True, separators=(",", ":"))
    return "xxh3-128:" + xxhash.xxh3_128(MODULE_DOMAIN + text.encode("ascii")).hexdigest()


def test_the_digest_is_the_documented_merkle_tree_of_relative_names():
    got = module_digests([("enc.0.w", D1), ("enc.0.b", D2), ("enc.1.w", D3), ("head", D1)])
    zero = by_hand([["w", "tensor", D1], ["b", "tensor", D2]])
    one = by_hand([["w", "tensor", D3]])
    enc = by_hand([["0", "module", zero], ["1", "module", one]])
    assert got == {
        "enc.0": zero,
        "enc.1": one,
        "enc": enc,
        "": by_hand([["enc", "module", enc], ["head", "tensor", D1]]),
    }
    counts = {p: m.tensor_count for p, m in module_identities([("enc.0.w", D1), ("enc.0.b", D2), ("x", D3)]).items()}
    assert counts == {"enc.0": 2, "enc": 2, "": 3}


def test_modules_match_at_any_path_when_their_members_match_under_relative_names():
    a = module_digests([("encoder.layer.0.attn.q", D1), ("encoder.layer.0.attn.k", D2), ("encoder.layer.0.norm", D3)])
    b = module_digests([("layers.3.norm", D3), ("layers.3.attn.k", D2), ("layers.3.attn.q", D1)])  # any order
    assert a["encoder.layer.0"] == b["layers.3"] and a["encoder.layer.0.attn"] == b["layers.3.attn"]
    assert a["encoder.layer"] != b["layers"]  # their children are named 0 and 3
    renamed = module_digests([("layers.3.norm", D3), ("layers.3.attn.k", D2), ("layers.3.attn.v", D1)])
    changed = module_digests([("layers.3.norm", D3), ("layers.3.attn.k", D2), ("layers.3.attn.q", D3)])
    extra = module_digests(
        [("layers.3.norm", D3), ("layers.3.attn.k", D2), ("layers.3.attn.q", D1), ("layers.3.x", D1)]
    )
    assert len({b["layers.3"], renamed["layers.3"], changed["layers.3"], extra["layers.3"]}) == 4
    # a flat list of names is not a nested one: "a.b" the tensor differs from module a holding b
    assert module_digests([("a.b", D1)])[""] != module_digests([("a_b", D1)])[""]
    assert [m.to_json() for m in moved_modules(a, b)] == [{"a": "encoder.layer.0", "b": "layers.3"}]


def test_a_member_without_digest_makes_only_its_modules_unknown():
    got = module_digests([("a.x", D1), ("a.y", None), ("b.x", D1)])
    assert got["a"] is None and got[""] is None
    assert got["b"] == by_hand([["x", "tensor", D1]])


def test_a_name_that_is_a_tensor_and_a_module_and_very_deep_names():
    both = module_digests([("a", D1), ("a.b", D2)])
    assert both[""] == by_hand([["a", "module", both["a"]], ["a", "tensor", D1]])
    deep = ".".join(["m"] * 5000)
    assert len(module_digests([(deep + ".w", D1)])) == 5001  # no recursion limit


def _file_digests(path: Path) -> dict[str, str]:
    ckpt = open_checkpoint(path)
    stats = compute_stats(ckpt.tensors)
    out = {}
    for t in ckpt.tensors:
        digest = stats[t.name].digest
        assert digest is not None and digest == tensor_digest(t)  # the stats pass's is the one outside it
        out[t.name] = digest
    return out


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder, safe_serialization=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "state.pt")
    return state, folder / "model.safetensors", folder / "state.pt"


def test_the_same_state_dict_has_the_same_digests_in_safetensors_and_torch_zip(bert_files):
    state, safetensors_path, pt_path = bert_files
    st, pt = _file_digests(safetensors_path), _file_digests(pt_path)
    assert set(st) <= set(pt) and len(st) >= len(state) - 1  # save_pretrained may drop a non-persistent buffer
    assert all(st[n] == pt[n] for n in st)
    matrices = [n for n in st if state[n].dim() == 2]
    assert len({st[n] for n in matrices}) == len(matrices)  # random weights: all different
    q, k = "encoder.layer.0.attention.self.query.bias", "encoder.layer.1.attention.self.key.bias"
    assert not state[q].any() and st[q] == st[k]  # equal zero biases: one digest
    assert st[q] != st["encoder.layer.0.intermediate.dense.bias"]  # zeros of another shape
    ms, mp = module_digests(st.items()), module_digests((n, pt[n]) for n in st)
    assert ms == mp and ms["encoder.layer.0"] is not None
    assert ms["encoder.layer.0"] != ms["encoder.layer.1"]


def test_a_renamed_layer_in_another_file_has_the_module_digest_of_the_original(bert_files, tmp_path):
    state, safetensors_path, _ = bert_files
    prefix = "encoder.layer.1."
    moved = {"layers.3." + k[len(prefix) :]: v.to(torch.float32) for k, v in state.items() if k.startswith(prefix)}
    moved["layers.3.attention.self.query.weight"] = moved["layers.3.attention.self.query.weight"].t().contiguous().t()
    save_file({k: v.contiguous() for k, v in moved.items()}, tmp_path / "moved.safetensors")
    original = module_digests(_file_digests(safetensors_path).items())
    other = module_digests(_file_digests(tmp_path / "moved.safetensors").items())
    assert other["layers.3"] == original["encoder.layer.1"]
    assert [m.to_json() for m in moved_modules(original, other) if m.b == "layers.3"] == [
        {"a": "encoder.layer.1", "b": "layers.3"}
    ]
    bumped = dict(moved)
    bumped["layers.3.output.dense.bias"] = bumped["layers.3.output.dense.bias"].clone()
    bumped["layers.3.output.dense.bias"][0] += 1e-3
    save_file({k: v.contiguous() for k, v in bumped.items()}, tmp_path / "bumped.safetensors")
    assert module_digests(_file_digests(tmp_path / "bumped.safetensors").items())["layers.3"] != other["layers.3"]


def test_bf16_and_transposed_views_hash_their_logical_values(tmp_path):
    w = torch.randn(6, 5).to(torch.bfloat16)
    save_file({"w": w, "wt": w.t().contiguous()}, tmp_path / "a.safetensors")
    torch.save({"w": w, "wt": w.t()}, tmp_path / "b.pt")  # a transposed view of the same storage
    a, b = _file_digests(tmp_path / "a.safetensors"), _file_digests(tmp_path / "b.pt")
    assert a == b and a["w"] != a["wt"]
