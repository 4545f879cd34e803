"""Folders read as one checkpoint (formats/folder.py): Hugging Face model folders written by
transformers, peft and diffusers ``save_pretrained``, a real Trainer ``checkpoint-N/``, a
torch.distributed.checkpoint directory; each listing compared with the producer's own loader, in
the library and through ``ckptscope inspect DIR --json``. Then the refusals: what a folder holds
when it is no checkpoint, links out of it, its size bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptscope.config import Settings
from ckptscope.errors import CheckpointError
from ckptscope.formats import folder as folder_format
from ckptscope.formats import open_checkpoint
from ckptscope.formats.folder import plan_folder
from ckptscope.formats.sandbox import open_checkpoint_sandboxed
from tests import factories as f
from tests import folder_producers as producers
from tests.helpers import assert_one_line_refusal


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, timeout=180)


def listed(ckpt, root: str | None = None) -> producers.Truth:
    return {t.name: (tuple(t.shape), t.shown_dtype) for t in ckpt.root_tensors(root)}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {
        "gpt2-safe": producers.hf_model(root),
        "gpt2-bin": producers.hf_model(root, safe=False),
        "gpt2-safe-sharded": producers.hf_model(root, max_shard_size="40KB"),
        "gpt2-bin-sharded": producers.hf_model(root, safe=False, max_shard_size="40KB"),
        "lora-safe": producers.peft_adapter(root),
        "lora-bin": producers.peft_adapter(root, safe=False),
        "vae": producers.diffusers_vae(root),
        "trainer": producers.trainer_checkpoint(root),
    }


def weight_files(folder: Path) -> list[str]:
    """The weights files save_pretrained wrote: the index's shards, or the one weights file."""
    index = next(folder.glob("*.index.json"), None)
    if index is not None:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]


HF_CASES = {
    # case: (the file the folder is read from, the format of the listing, files ignored)
    "gpt2-safe": ("model.safetensors", "safetensors", ["config.json", "generation_config.json"]),
    "gpt2-bin": ("pytorch_model.bin", "torch-zip", ["config.json", "generation_config.json"]),
    "gpt2-safe-sharded": ("model.safetensors.index.json", "sharded-safetensors", ["config.json"]),
    "gpt2-bin-sharded": ("pytorch_model.bin.index.json", "sharded-torch", ["config.json"]),
    "lora-safe": ("adapter_model.safetensors", "safetensors", ["README.md", "adapter_config.json"]),
    "lora-bin": ("adapter_model.bin", "torch-zip", ["README.md", "adapter_config.json"]),
    "vae": ("diffusion_pytorch_model.safetensors", "safetensors", ["config.json"]),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_folder_lists_what_the_producer_saved(made, case):
    folder = made[case]
    primary, fmt, ignored = HF_CASES[case]
    files = weight_files(folder)
    if "sharded" in case:
        assert len(files) >= 2, files  # the small max_shard_size really sharded it
    truth = producers.weights_truth(folder, files)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == fmt
    assert listed(ckpt) == truth
    assert sorted(Path(p).name for p in ckpt.files if not p.endswith(".json")) == sorted(files)
    assert any(w == f"folder: read {primary} (model weights)" for w in ckpt.warnings), ckpt.warnings
    ignored_note = next(w for w in ckpt.warnings if w.startswith("ignored (not a checkpoint file)"))
    assert all(name in ignored_note for name in ignored), ignored_note


def test_hf_folders_match_the_models_from_pretrained(made):
    """What the folders hold is what from_pretrained loads (tied lm_head aside: not saved)."""
    from diffusers import AutoencoderKL
    from peft.utils import load_peft_weights
    from transformers import GPT2LMHeadModel

    for case in ("gpt2-safe", "gpt2-bin", "gpt2-safe-sharded", "gpt2-bin-sharded"):
        state = GPT2LMHeadModel.from_pretrained(made[case]).state_dict()
        for name, (shape, dtype) in listed(open_checkpoint(made[case])).items():
            assert tuple(state[name].shape) == shape and str(state[name].dtype) == f"torch.{dtype}", (case, name)
    for case in ("lora-safe", "lora-bin"):
        adapter = load_peft_weights(str(made[case]))
        got = listed(open_checkpoint(made[case]))
        assert got == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in adapter.items()}
        assert any("lora_A" in k for k in got)
    vae = AutoencoderKL.from_pretrained(made["vae"]).state_dict()
    got = listed(open_checkpoint(made["vae"]))
    assert got == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vae.items()}


def test_safetensors_preferred_over_bin_and_index_over_single(made, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(made["gpt2-safe"], both)
    shutil.copy(made["gpt2-bin"] / "pytorch_model.bin", both)
    ckpt = open_checkpoint(both)
    assert ckpt.format == "safetensors" and [Path(p).name for p in ckpt.files] == ["model.safetensors"]
    assert "ignored (the safetensors weights are read instead): pytorch_model.bin" in ckpt.warnings

    sharded = tmp_path / "sharded-and-single"
    shutil.copytree(made["gpt2-safe-sharded"], sharded)
    shutil.copy(made["gpt2-safe"] / "model.safetensors", sharded)
    for p in made["gpt2-bin-sharded"].glob("pytorch_model*"):
        shutil.copy(p, sharded)
    ckpt = open_checkpoint(sharded)
    assert ckpt.format == "sharded-safetensors"
    assert "ignored (model.safetensors.index.json is read instead): model.safetensors" in ckpt.warnings
    bins = next(w for w in ckpt.warnings if w.startswith("ignored (the safetensors weights are read instead)"))
    assert "pytorch_model.bin.index.json" in bins and "pytorch_model-00001-of-" in bins


def test_trainer_checkpoint_is_one_checkpoint_with_a_root_per_file(made):
    folder = made["trainer"]
    assert folder.name == "checkpoint-1"
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "trainer-safetensors" and ckpt.default_root == "model"
    assert listed(ckpt, "") == producers.trainer_truth(folder)
    assert listed(ckpt) == producers.weights_truth(folder, ["model.safetensors"])  # the default root
    roots = {r.path: r.tensor_count for r in ckpt.roots}
    assert roots["model"] == len(producers.weights_truth(folder, ["model.safetensors"]))
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert roots["optimizer.state"] == sum(len(v) for v in optimizer["state"].values())
    assert "rng_state" in roots
    everything = ["model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"]
    assert sorted(Path(p).name for p in ckpt.files) == sorted([*everything, "trainer_state.json"])
    # metadata per file, prefixed; trainer_state.json summarised
    assert ckpt.metadata["optimizer.param_groups.0.lr"] == optimizer["param_groups"][0]["lr"]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert ckpt.metadata["trainer_state.global_step"] == state["global_step"] == 1
    assert ckpt.metadata["trainer_state.log_history.last.loss"] == state["log_history"][-1]["loss"]
    assert ckpt.metadata["trainer_state.log_history.entries"] == 1
    # the files without tensors (or not readable) are warnings, not a failure of the folder
    for name in ("scheduler.pt", "training_args.bin"):
        assert any(w.startswith(f"{name}: ") for w in ckpt.warnings), ckpt.warnings
    # ... and their values are metadata: the scheduler's state, the TrainingArguments dataclass
    scheduler = torch.load(folder / "scheduler.pt", weights_only=True)
    assert ckpt.metadata["scheduler.last_epoch"] == scheduler["last_epoch"]
    args = ckpt.metadata["training_args"]
    assert args["__class__"] == "transformers.training_args.TrainingArguments"
    assert args["per_device_train_batch_size"] == state["train_batch_size"]
    assert "folder: read model.safetensors (transformers Trainer checkpoint)" in ckpt.warnings
    # Adam's moments sit under the optimizer root, the model's under "model"
    assert listed(ckpt, "optimizer.state.0") == producers.flatten(optimizer["state"][0])


def test_trainer_folder_survives_a_damaged_file(made, tmp_path):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(made["trainer"], folder)
    (folder / "optimizer.pt").write_bytes(b"PK\x03\x04 not really a zip")
    ckpt = open_checkpoint(folder)
    assert any(w.startswith("optimizer.pt: not read: ") for w in ckpt.warnings), ckpt.warnings
    assert listed(ckpt) == producers.weights_truth(folder, ["model.safetensors"])
    assert not any(r.path.startswith("optimizer") for r in ckpt.roots)


@pytest.mark.parametrize("case", [*HF_CASES, "trainer"])
def test_cli_inspect_dir_json(made, case):
    folder = made[case]
    out = run_cli("inspect", str(folder), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    if case == "trainer":
        truth = producers.weights_truth(folder, ["model.safetensors"])
        assert data["root"] == "model" and data["format"] == "trainer-safetensors"
        assert {r["path"] for r in data["roots"]} >= {"model", "optimizer", "rng_state"}
    else:
        truth = producers.weights_truth(folder, weight_files(folder))
        assert data["format"] == HF_CASES[case][1]
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in data["tensors"]} == truth
    # stats are computed from the folder's own files: one tensor against the producer's values
    name = next(n for n, (shape, _) in truth.items() if len(shape) == 2)
    files = ["model.safetensors"] if case == "trainer" else weight_files(folder)
    tensor = next(v for p in files for k, v in producers._load(folder / p).items() if k == name)
    stats = next(t["stats"] for t in data["tensors"] if t["name"] == name)
    assert stats["mean"] == pytest.approx(tensor.double().mean().item(), rel=1e-6, abs=1e-9)


def test_cli_other_roots_and_commands_on_a_folder(made, tmp_path):
    folder = made["trainer"]
    out = run_cli("inspect", str(folder), "--json", "--no-stats", "--root", "optimizer.state")
    assert out.returncode == 0, out.stderr
    names = {t["name"] for t in json.loads(out.stdout)["tensors"]}
    assert "0.exp_avg" in names and "0.exp_avg_sq" in names
    target = tmp_path / "model.safetensors"
    out = run_cli("export", str(folder), "-o", str(target))
    assert out.returncode == 0, out.stderr
    from safetensors import safe_open

    with safe_open(target, "pt") as fh:
        assert set(fh.keys()) == set(producers.weights_truth(folder, ["model.safetensors"]))
        meta = fh.metadata()
    assert meta["ckptscope.source_name"] == "checkpoint-1" and len(meta["ckptscope.source_sha256"]) == 64
    out = run_cli("diff", str(made["gpt2-safe"]), str(made["gpt2-safe-sharded"]), "--json")
    assert out.returncode == 0, out.stderr
    same = producers.weights_truth(made["gpt2-safe"], ["model.safetensors"])  # one seed: the same weights
    assert json.loads(out.stdout)["counts"]["identical"] == len(same)


def test_dcp_folder(tmp_path):
    folder = producers.dcp_folder(tmp_path)
    (folder / "README.md").write_text("step 3")
    ckpt = open_checkpoint(folder)
    assert listed(ckpt, "") == producers.dcp_truth(folder)
    assert ckpt.warnings[:2] == [
        "folder: read .metadata (torch.distributed.checkpoint)",
        "ignored (not a checkpoint file): README.md",
    ]
    assert sorted(Path(p).name for p in ckpt.files) == [".metadata", "__0_0.distcp"]
    out = run_cli("inspect", str(folder), "--json", "--no-stats")
    assert out.returncode == 0, out.stderr
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in json.loads(out.stdout)["tensors"]} == listed(ckpt)


# --- the sandbox and a folder given as its files (an upload) ------------------------------------


def test_sandboxed_directory_and_a_folder_given_as_files(made, tmp_path):
    limits = Settings().parse_limits
    folder = made["gpt2-safe-sharded"]
    by_dir = open_checkpoint_sandboxed(folder, limits=limits)
    assert listed(by_dir) == producers.weights_truth(folder, weight_files(folder))
    # the upload's case: each file stored under another name (blobs), the folder's names given
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    files = {}
    for i, p in enumerate(sorted(folder.iterdir())):
        files[p.name] = blobs / f"blob{i}"
        shutil.copy(p, files[p.name])
    by_files = open_checkpoint_sandboxed(files["config.json"], limits=limits, shards=files, folder=True)
    assert listed(by_files) == listed(by_dir)
    assert {Path(p).name for p in by_files.files} <= {p.name for p in files.values()}


# --- what is not a checkpoint, links, bounds ------------------------------------------------------


def test_empty_and_non_checkpoint_folders_are_refused_naming_what_is_there(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in this folder: it is empty"):
        open_checkpoint(empty)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "README.md").write_text("hi")
    (docs / "config.json").write_text("{}")
    (docs / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(docs)
    assert err.value.code == "no_checkpoint"
    assert err.value.message == "no checkpoint in this folder: found README.md, config.json, sub/"
    assert_one_line_refusal(run_cli("inspect", str(docs)), "no checkpoint in this folder: found README.md")


def test_ambiguous_and_fragment_folders(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    f.save_torch({"a": torch.ones(1)}, two / "a.pt")
    f.save_torch({"b": torch.ones(1)}, two / "b.pt")
    with pytest.raises(CheckpointError, match=r"found a\.pt, b\.pt \(several weight files and no index"):
        open_checkpoint(two)
    fragment = tmp_path / "fragment"
    fragment.mkdir()
    (fragment / "__0_0.distcp").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"without its \.metadata"):
        open_checkpoint(fragment)
    one = tmp_path / "one"
    one.mkdir()
    f.save_torch({"w": torch.ones(2)}, one / "weights.pt")
    (one / "notes.txt").write_text("x")
    assert [t.name for t in open_checkpoint(one).tensors] == ["w"]


def test_a_refused_weights_file_says_which_file(tmp_path):
    folder = tmp_path / "onnx-export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(f.onnx_like_file(tmp_path / "x.onnx").read_bytes())
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)
    assert err.value.code == "onnx" and err.value.message.startswith("model.onnx: this is an ONNX model")


def test_links_out_of_the_folder_are_never_followed(made, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(made["gpt2-safe"], outside)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(outside / "model.safetensors")
    (linked / "config.json").symlink_to(outside / "config.json")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(linked)
    assert "model.safetensors (a link out of the folder)" in err.value.message
    assert_one_line_refusal(run_cli("inspect", str(linked)), "a link out of the folder")
    # a link to a file inside the folder is that file
    inside = tmp_path / "inside"
    shutil.copytree(made["gpt2-safe"], inside)
    (inside / "model.safetensors").rename(inside / "weights-v1.safetensors")
    (inside / "model.safetensors").symlink_to("weights-v1.safetensors")
    (inside / "elsewhere.pt").symlink_to(outside / "model.safetensors")
    ckpt = open_checkpoint(inside)
    assert listed(ckpt) == producers.weights_truth(outside, ["model.safetensors"])
    assert "links out of the folder, not followed: elsewhere.pt" in ckpt.warnings
    # a sharded index whose shard is a link out of the folder cannot reach it either
    sharded = tmp_path / "sharded"
    shutil.copytree(made["gpt2-safe-sharded"], sharded)
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.move(shard, tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(sharded)
    assert err.value.code == "missing_shard"


def test_the_number_of_entries_looked_at_is_bounded(tmp_path, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i}.txt").write_text("x")
    monkeypatch.setattr(folder_format, "MAX_ENTRIES", 10)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)
    assert err.value.code == "limit_exceeded" and "more than 10 entries" in err.value.message


def test_unread_files_of_a_folder_are_named(made, tmp_path):
    folder = tmp_path / "stray"
    shutil.copytree(made["gpt2-safe-sharded"], folder)
    f.save_safetensors({"x": torch.ones(1)}, folder / "extra.safetensors")
    ckpt = open_checkpoint(folder)
    assert "not read (not part of the checkpoint): extra.safetensors" in ckpt.warnings


def test_plan_by_names():
    plan = plan_folder(["model.safetensors", "pytorch_model.bin", "config.json", ".DS_Store", "tokenizer.json"])
    assert (plan.kind, plan.primary, plan.reads) == ("weights", "model.safetensors", ["model.safetensors"])
    assert plan.ignored == {
        "config.json": "not a checkpoint file",
        "tokenizer.json": "not a checkpoint file",
        "pytorch_model.bin": "the safetensors weights are read instead",
    }
    plan = plan_folder([".metadata", "__0_0.distcp", "__1_0.distcp", "README.md"])
    assert (plan.kind, plan.primary, plan.reads) == ("dcp", ".metadata", [".metadata", "__0_0.distcp", "__1_0.distcp"])
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    plan = plan_folder([*names, "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "ema.pt"])
    assert plan.kind == "trainer" and plan.primary == "model.safetensors.index.json"
    assert plan.roots == {
        "model.safetensors.index.json": "model",
        "ema.pt": "ema",
        "optimizer.pt": "optimizer",
        "rng_state_0.pth": "rng_state_0",
        "rng_state_1.pth": "rng_state_1",
    }
    others = {"optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "ema.pt"}
    assert set(plan.reads) == {*names, *others}
