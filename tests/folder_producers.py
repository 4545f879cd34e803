"""Folders written by the real producers (tiny random-init models built from configs, seeded,
offline), and what the producers' own loaders say they hold: for tests/formats/test_folders.py and
tests/web/test_folder_upload.py.

Each builder writes one folder under ``root`` and returns it; ``truth`` is {name: (shape, dtype)}
of the tensors the folder's checkpoint holds, read back with the producer library's loader."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

Truth = dict[str, tuple[tuple[int, ...], str]]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def hf_model(root: Path, *, safe: bool = True, max_shard_size: str | None = None) -> Path:
    """transformers ``save_pretrained``: config.json, generation_config.json and the weights
    (one file, or a sharded set with its index when ``max_shard_size`` is small)."""
    out = root / f"gpt2-{'safe' if safe else 'bin'}{'-sharded' if max_shard_size else ''}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    _tiny_gpt2().save_pretrained(out, safe_serialization=safe, **kwargs)
    return out


def peft_adapter(root: Path, *, safe: bool = True) -> Path:
    """peft ``get_peft_model`` (LoRA on a tiny GPT-2) then ``save_pretrained``: README.md,
    adapter_config.json, adapter_model.safetensors (or .bin)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    out = root / f"lora-{'safe' if safe else 'bin'}"
    model.save_pretrained(out, safe_serialization=safe)
    return out


def diffusers_vae(root: Path) -> Path:
    """diffusers ``AutoencoderKL`` from a config, ``save_pretrained``: config.json and
    diffusion_pytorch_model.safetensors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    out = root / "vae"
    vae.save_pretrained(out)
    return out


def trainer_checkpoint(root: Path) -> Path:
    """A real transformers ``Trainer`` run of one step (CPU, no reporting) with save_steps=1: its
    ``checkpoint-1/`` folder (model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth,
    training_args.bin, trainer_state.json, config files)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(8) + i) % 50
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    args = TrainingArguments(
        output_dir=str(root / "run"),
        max_steps=1,
        save_steps=1,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        logging_steps=1,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return root / "run" / "checkpoint-1"


def dcp_folder(root: Path) -> Path:
    """torch.distributed.checkpoint.save of a small state dict, one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.zeros(4, dtype=torch.bfloat16), "step": torch.tensor(3)}
    out = root / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(out))
    return out


# --- the producers' loaders -----------------------------------------------------------------


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True, map_location="cpu")


def weights_truth(folder: Path, files: list[str]) -> Truth:
    """Each weights file of the folder read with the producer's loader (safetensors' load_file,
    torch.load with weights_only=True)."""
    out: Truth = {}
    for name in files:
        out |= {k: (tuple(v.shape), _dtype(v)) for k, v in _load(folder / name).items()}
    return out


def flatten(obj: object, prefix: str = "") -> Truth:
    """Tensors inside nested dicts/lists/tuples, by dotted key path."""
    out: Truth = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = (tuple(obj.shape), _dtype(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out |= flatten(v, f"{prefix}.{i}" if prefix else str(i))
    return out


def trainer_truth(folder: Path) -> Truth:
    """A Trainer folder as one checkpoint: root "model" (safetensors' load_file), "optimizer"
    (torch.load, weights_only), "rng_state" (torch.load of our own fixture: it pickles numpy RNG
    state, which weights_only refuses)."""
    out = {f"model.{k}": v for k, v in weights_truth(folder, ["model.safetensors"]).items()}
    out |= flatten(torch.load(folder / "optimizer.pt", weights_only=True), "optimizer")
    out |= flatten(torch.load(folder / "rng_state.pth", weights_only=False), "rng_state")  # our own file
    return out


def dcp_truth(folder: Path) -> Truth:
    """torch.distributed.checkpoint's own reader: the metadata's tensor entries."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata()
    return {
        k: (tuple(m.size), _dtype(torch.empty(0, dtype=m.properties.dtype)))
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
