"""The module tree: nesting, numeric ordering and roll-ups."""

from __future__ import annotations

from ckptscope.formats import open_checkpoint
from ckptscope.stats import TensorStats, build_tree
from tests import factories as f


def test_tree_groups_modules_and_sorts_layers_numerically(tmp_path):
    model = f.TinyTransformer(layers=12)
    # safetensors sorts names as strings (layers.10 before layers.2); the tree must not
    path = f.save_safetensors(
        {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, tmp_path / "m.safetensors"
    )
    tree = build_tree(open_checkpoint(path).tensors)
    layers = tree.find("layers")
    assert [c.name for c in layers.child_list()] == [str(i) for i in range(12)]
    top = [c.name for c in tree.child_list()]
    assert set(top) == {"embed", "layers", "norm"}
    assert tree.find("layers.3.self_attn").tensor_count == 4  # in_proj w/b + out_proj w/b
    assert tree.find("layers.3.self_attn.out_proj.weight").tensor is not None


def test_rollups_count_aliases_once_and_separate_buffers(tmp_path):
    sd = f.TinyTransformer(layers=1).state_dict()
    ckpt = open_checkpoint(f.save_torch(sd, tmp_path / "m.pt"))
    tree = build_tree(ckpt.tensors)
    total_unique = sum(t.nbytes for name, t in sd.items() if name != "lm_head.weight")
    assert tree.tensor_count == len(sd)
    assert tree.alias_count == 1
    assert tree.nbytes == total_unique
    assert tree.find("lm_head").alias_count == 1 and tree.find("lm_head").nbytes == 0
    cnn = open_checkpoint(f.save_torch(f.cnn_state_dict(), tmp_path / "c.pt")).tensors
    bn = build_tree(cnn).find("features.1")
    assert bn.buffer_count == 3  # running_mean, running_var, num_batches_tracked
    assert bn.param_numel == 16  # weight + bias of 8 channels
    assert bn.dtypes == {"float32": 4, "int64": 1}


def test_rollups_sum_nan_and_inf_from_stats(tmp_path):
    import torch

    tensors = {"a.x": torch.tensor([float("nan"), 1.0]), "a.y": torch.tensor([float("inf")]), "b.z": torch.ones(2)}
    ckpt = open_checkpoint(f.save_safetensors(tensors, tmp_path / "n.safetensors"))
    stats = {"a.x": TensorStats(numel=2, nan=1), "a.y": TensorStats(numel=1, inf=1), "b.z": TensorStats(numel=2)}
    tree = build_tree(ckpt.tensors, stats)
    assert (tree.find("a").nan, tree.find("a").inf) == (1, 1)
    assert (tree.find("b").nan, tree.find("b").inf) == (0, 0)
    assert tree.to_json()["children"][0]["path"] == "a"
