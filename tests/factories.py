"""Real checkpoints made with real torch/safetensors, generated at test time (never committed)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embedding and lm_head share one weight (tied), like GPT-2."""

    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def cnn_state_dict() -> dict[str, torch.Tensor]:
    seeded(1)
    model = SmallCNN()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # moves BatchNorm running stats off their defaults
    return model.state_dict()


def save_torch(obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def training_checkpoint(path: Path) -> Path:
    """A Lightning-style checkpoint: weights under state_dict, Adam state, plain values."""
    seeded(2)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
    return save_torch(
        {
            "epoch": 7,
            "global_step": 1234,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "hyper_parameters": {"lr": 1e-3, "name": "cnn", "betas": (0.9, 0.999)},
        },
        path,
    )


def sharded_safetensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_safetensors(part, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = directory / "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def relocate_to_cuda(src: Path, dst: Path) -> Path:
    """Rewrite a CPU torch zip so its storages say they were saved on cuda:0 (as on a GPU box)."""
    old = b"X\x03\x00\x00\x00cpu"
    new = b"X\x06\x00\x00\x00cuda:0"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info.filename, data)
    return dst


def relocate_legacy_to_cuda(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    old = b"X\x03\x00\x00\x00cpu"
    assert old in data
    dst.write_bytes(data.replace(old, b"X\x06\x00\x00\x00cuda:0"))
    return dst


def torchscript_file(path: Path) -> Path:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
    return path


def legacy_tar_file(path: Path) -> Path:
    import tarfile

    with tarfile.open(path, "w") as tar:
        payload = b"not really storages"
        info = tarfile.TarInfo("storages")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def onnx_like_file(path: Path) -> Path:
    # ModelProto: ir_version (field 1, varint) then producer_name (field 2) "pytorch".
    path.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0" + bytes(64))
    return path


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in row-major order, as a file stores them."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())
