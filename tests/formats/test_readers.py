"""Readers: every format sniffed by content, listed without reading tensor data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ckptscope.errors import UnknownRoot
from ckptscope.formats import CheckpointError, open_checkpoint, sniff
from tests import factories as f


def _by_name(ckpt, root=None):
    return {t.name: t for t in ckpt.root_tensors(root)}


def _assert_matches_state_dict(listed, sd):
    assert set(listed) == set(sd)
    for name, tensor in sd.items():
        info = listed[name]
        assert info.dtype == str(tensor.dtype).removeprefix("torch."), name
        assert info.shape == tuple(tensor.shape), name
        assert info.numel == tensor.numel()
        assert info.nbytes == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_file_lists_every_tensor(tmp_path, legacy):
    sd = f.cnn_state_dict()
    # the extension says nothing: the format is sniffed from content
    path = f.save_torch(sd, tmp_path / "weights.bin", legacy=legacy)
    ckpt = open_checkpoint(path)
    assert ckpt.format == ("torch-legacy" if legacy else "torch-zip")
    listed = _by_name(ckpt)
    _assert_matches_state_dict(listed, sd)
    assert listed["features.1.running_mean"].kind == "buffer"
    assert listed["features.1.num_batches_tracked"].kind == "buffer"
    assert listed["features.1.weight"].kind == "parameter"
    assert listed["head.weight"].kind == "parameter"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_byte_offsets_point_at_the_tensor_data(tmp_path, legacy):
    sd = f.cnn_state_dict()
    path = f.save_torch(sd, tmp_path / "w.pt", legacy=legacy)
    raw = path.read_bytes()
    for t in open_checkpoint(path).tensors:
        expected = f.raw_bytes(sd[t.name])
        assert raw[t.data_offset : t.data_offset + t.nbytes] == expected, t.name


def test_safetensors_every_dtype_and_metadata(tmp_path):
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f32": torch.randn(2, 3),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(4).bfloat16(),
        "f8e4": torch.randn(5).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(5).to(torch.float8_e5m2),
        "i64": torch.arange(4),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(4, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "b": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    path = f.save_safetensors(tensors, tmp_path / "x.bin", metadata={"format": "pt", "note": "<b>hi</b>"})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors"
    listed = _by_name(ckpt)
    _assert_matches_state_dict(listed, tensors)
    assert ckpt.metadata == {"__metadata__.format": "pt", "__metadata__.note": "<b>hi</b>"}
    raw = path.read_bytes()
    for name, t in listed.items():
        assert raw[t.data_offset : t.data_offset + t.nbytes] == f.raw_bytes(tensors[name])


def test_tied_weights_are_aliases(tmp_path):
    model = f.TinyTransformer(layers=2)
    path = f.save_torch(model.state_dict(), tmp_path / "tied.pt")
    listed = _by_name(open_checkpoint(path))
    assert listed["lm_head.weight"].alias_of == "embed.weight"
    assert listed["embed.weight"].alias_of is None
    assert listed["layers.0.linear1.weight"].alias_of is None


def test_nested_training_checkpoint_roots_and_metadata(tmp_path):
    path = f.training_checkpoint(tmp_path / "last.ckpt")
    ckpt = open_checkpoint(path)
    roots = {r.path: r.tensor_count for r in ckpt.roots}
    assert ckpt.default_root == "state_dict"
    assert {"", "state_dict", "optimizer", "optimizer.state"} <= set(roots)
    sd_names = set(_by_name(ckpt))
    assert "head.weight" in sd_names and "features.1.running_var" in sd_names
    assert not any(n.startswith("optimizer") for n in sd_names)
    opt = _by_name(ckpt, "optimizer.state")
    assert "0.exp_avg" in opt and "0.exp_avg_sq" in opt
    assert opt["0.exp_avg"].shape == (8, 3, 3, 3)
    assert ckpt.metadata["epoch"] == 7
    assert ckpt.metadata["global_step"] == 1234
    assert ckpt.metadata["hyper_parameters.betas"] == [0.9, 0.999]
    assert ckpt.metadata["optimizer.param_groups.0.lr"] == 1e-3
    everything = _by_name(ckpt, "")
    assert "state_dict.head.weight" in everything and "optimizer.state.0.exp_avg" in everything
    with pytest.raises(UnknownRoot):
        ckpt.root_tensors("nope")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_storages_saved_on_cuda_still_open(tmp_path, legacy):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    src = f.save_torch(sd, tmp_path / "cpu.pt", legacy=legacy)
    relocate = f.relocate_legacy_to_cuda if legacy else f.relocate_to_cuda
    path = relocate(src, tmp_path / "cuda.pt")
    # the fixture is real: torch itself sees a cuda:0 storage
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    assert torch.equal(torch.load(path, weights_only=True, map_location="cpu")["w"], sd["w"])
    listed = _by_name(open_checkpoint(path))
    assert listed["w"].shape == (2, 3)


def test_bf16_and_fp16_torch_files(tmp_path):
    sd = {"a": torch.randn(4, 4).bfloat16(), "b": torch.randn(3).half(), "c": torch.randn(2).to(torch.float8_e4m3fn)}
    listed = _by_name(open_checkpoint(f.save_torch(sd, tmp_path / "half.pt")))
    _assert_matches_state_dict(listed, sd)


def test_views_keep_their_storage_geometry(tmp_path):
    base = torch.randn(4, 6)
    path = f.save_torch(
        {"t": base.t(), "every_other": base[:, ::2], "row": base[1], "e": torch.randn(3).expand(5, 3)},
        tmp_path / "v.pt",
    )
    listed = _by_name(open_checkpoint(path))
    assert listed["t"].shape == (6, 4) and listed["t"].stride == (1, 6)
    assert listed["every_other"].stride == (6, 2)
    assert listed["row"].storage_offset == 6
    assert listed["e"].stride == (0, 1)


def test_sharded_safetensors_set(tmp_path):
    sd = f.cnn_state_dict()
    index = f.sharded_safetensors(tmp_path, sd, shards=3)
    ckpt = open_checkpoint(index)
    assert ckpt.format == "sharded-safetensors"
    _assert_matches_state_dict(_by_name(ckpt), sd)
    assert ckpt.warnings == []
    assert len(ckpt.files) == 4
    assert ckpt.metadata["shards"] == sorted({p.name for p in tmp_path.glob("model-*.safetensors")})


def test_sharded_torch_bin_set(tmp_path):
    sd = f.cnn_state_dict()
    names = list(sd)
    f.save_torch({n: sd[n] for n in names[:4]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    f.save_torch({n: sd[n] for n in names[4:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < 4 else 2}-of-00002.bin" for i, n in enumerate(names)}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(index)
    assert ckpt.format == "sharded-torch"
    _assert_matches_state_dict(_by_name(ckpt), sd)


def test_sharded_reports_missing_unlisted_and_duplicated(tmp_path):
    a = {"x": torch.zeros(2), "y": torch.ones(2)}
    b = {"y": torch.ones(2), "z": torch.ones(3)}
    f.save_safetensors(a, tmp_path / "a.safetensors")
    f.save_safetensors(b, tmp_path / "b.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "gone": "b.safetensors"}}))
    ckpt = open_checkpoint(index)
    text = "\n".join(ckpt.warnings)
    assert "'gone' is listed in the index but missing" in text
    assert "'y' appears in both 'a.safetensors' and 'b.safetensors'" in text
    assert "'z' in shard 'b.safetensors' is not listed" in text


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("../etc/passwd", "plain file name"),
        ("/abs/model.safetensors", "plain file name"),
        ("sub\\x.safetensors", "plain file name"),
        ("..", "not allowed"),
    ],
)
def test_sharded_rejects_bad_shard_names(tmp_path, shard, message):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(index)
    assert err.value.code == "bad_index"


def test_sharded_rejects_wrong_format_shard(tmp_path):
    f.save_torch({"w": torch.zeros(2)}, tmp_path / "model-1.safetensors")  # a torch file in disguise
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="index expects safetensors"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"w": "model-1.bin"}}))
    with pytest.raises(CheckpointError, match="does not match the index's safetensors format"):
        open_checkpoint(index)


def test_sharded_missing_shard_file(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "absent.safetensors"}}))
    with pytest.raises(CheckpointError, match="'absent.safetensors' named by the index was not provided"):
        open_checkpoint(index)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/ckptscope-pwned",))


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (f.torchscript_file, "torchscript", "TorchScript archive"),
        (f.legacy_tar_file, "legacy_tar", "tar archive"),
        (f.onnx_like_file, "onnx", "ONNX"),
        (lambda p: (p.write_bytes(bytes(range(256)) * 40), p)[1], "unknown_format", "unrecognised file"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty", "empty"),
        (lambda p: (p.write_bytes(pickle.dumps({"a": 1}, protocol=2)), p)[1], "plain_pickle", "plain Python pickle"),
        (lambda p: (p.write_bytes(pickle.dumps(_Evil(), protocol=2)), p)[1], "unsafe_pickle", "posix.system"),
        (lambda p: f.save_torch({"evil": _Evil()}, p), "unsafe_pickle", "posix.system"),
        (lambda p: f.save_torch({"epoch": 3}, p), "no_tensors", "no tensors"),
    ],
    ids=[
        "torchscript",
        "tar",
        "onnx",
        "random",
        "empty",
        "plain-pickle",
        "raw-reduce",
        "zip-reduce",
        "no-tensors",
    ],
)
def test_refused_files_name_what_they_are(tmp_path, make, code, message):
    path = make(tmp_path / "upload.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(path)
    assert err.value.code == code
    assert not Path("/tmp/ckptscope-pwned").exists()


def test_truncated_files_are_clean_errors(tmp_path):
    sd = f.cnn_state_dict()
    for name, path in {
        "zip": f.save_torch(sd, tmp_path / "a.pt"),
        "legacy": f.save_torch(sd, tmp_path / "b.pt", legacy=True),
        "st": f.save_safetensors(sd, tmp_path / "c.safetensors"),
    }.items():
        data = path.read_bytes()
        for cut in (9, 40, len(data) // 2, len(data) - 5):
            bad = tmp_path / f"{name}-{cut}"
            bad.write_bytes(data[:cut])
            with pytest.raises(CheckpointError):
                open_checkpoint(bad)


def test_sniff_ignores_extensions(tmp_path):
    st = f.save_safetensors({"a": torch.zeros(1)}, tmp_path / "model.pt")
    pt = f.save_torch({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert sniff(st) == "safetensors"
    assert sniff(pt) == "zip"
