"""Generate the benchmark checkpoints by streaming: a multi-GB file never sits in memory."""

from __future__ import annotations

import ctypes
import json
import os
import struct
from pathlib import Path

import torch

CODES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def llm_shapes(layers: int = 34, dim: int = 1024, ffn: int = 2816, vocab: int = 32000) -> list[tuple[str, tuple]]:
    """~500M parameters (2.0 GB fp32) shaped like a Llama: ~300 tensors."""
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, dim))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (dim,)),
            (p + "self_attn.q_proj.weight", (dim, dim)),
            (p + "self_attn.k_proj.weight", (dim, dim)),
            (p + "self_attn.v_proj.weight", (dim, dim)),
            (p + "self_attn.o_proj.weight", (dim, dim)),
            (p + "post_attention_layernorm.weight", (dim,)),
            (p + "mlp.gate_proj.weight", (ffn, dim)),
            (p + "mlp.up_proj.weight", (ffn, dim)),
            (p + "mlp.down_proj.weight", (dim, ffn)),
        ]
    shapes += [("model.norm.weight", (dim,)), ("lm_head.weight", (vocab, dim))]
    return shapes


def small_shapes(count: int = 20000) -> list[tuple[str, tuple]]:
    return [(f"blocks.{i // 10}.unit{i % 10}.weight", (8, 16 + (i % 7) * 8)) for i in range(count)]


def write_safetensors(
    path: Path, shapes: list[tuple[str, tuple]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n * itemsize]}
        offset += n * itemsize
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            n = 1
            for s in shape:
                n *= s
            scale = 1.0 if "norm" in name else 0.02
            done = 0
            while done < n:
                k = min(1 << 24, n - done)
                chunk = (torch.randn(k, generator=gen) * scale).to(dtype)
                out.write(ctypes.string_at(chunk.data_ptr(), k * itemsize))
                done += k
    return path


def write_torch_copy(src: Path, dst: Path) -> Path:
    """The same tensors as a torch.save-compatible zip, streamed by ckptscope's own writer."""
    from ckptscope.formats import open_checkpoint
    from ckptscope.formats.writers import OutputTensor, write_torch_zip

    ckpt = open_checkpoint(src)
    write_torch_zip(dst, [OutputTensor(t.name, t) for t in ckpt.tensors], {})
    return dst


def write_shards(src: Path, folder: Path, shards: int = 5) -> Path:
    """The tensors of the safetensors file ``src`` split in file order into ``shards`` files of about
    equal size, named as Hugging Face names them, with their ``model.safetensors.index.json``: the
    same model as a sharded set. The bytes are copied (copy_file_range), not regenerated, so both
    sets hold the same values. Returns the index."""
    with open(src, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    data_start = 8 + length
    metadata = header.pop("__metadata__", {})
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    total = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names)
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        if groups[-1] and filled >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        filled += end - begin
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    with open(src, "rb") as source:
        for i, group in enumerate(groups, 1):
            shard = folder / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            own: dict[str, object] = {"__metadata__": metadata}
            offset = 0
            for name in group:
                begin, end = header[name]["data_offsets"]
                own[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
                offset += end - begin
                weight_map[name] = shard.name
            raw = json.dumps(own).encode()
            raw += b" " * (-len(raw) % 8)
            with open(shard, "wb") as out:
                out.write(struct.pack("<Q", len(raw)) + raw)
                out.flush()
                begin = header[group[0]]["data_offsets"][0]  # a group is contiguous in src: one range
                left = header[group[-1]]["data_offsets"][1] - begin
                position = data_start + begin
                while left:
                    done = os.copy_file_range(source.fileno(), out.fileno(), left, position)
                    if done == 0:
                        raise OSError(f"{src} ended early")
                    position += done
                    left -= done
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index
