"""Write the harnesses' seed corpora at run time (no binary is committed).

    python -m fuzz.seeds OUTDIR        # OUTDIR/readers/ and OUTDIR/kernel/

``readers/``: small valid files made with torch.save (zip and the legacy format, pickle protocols
2 and 4), safetensors and sharded sets (index + ``SHARD_SEPARATOR`` + shard), covering the
dtypes, parameters, tied and strided views, empty and scalar tensors, nested training
checkpoints and ckptscope's own export metadata; probes aimed at bug classes found before (deep
nesting, exponential sharing, unhashable values); and the hostile corpus of
``tests/hostile_corpus.py`` (its files up to ``MAX_SEED_BYTES``, a sharded case as its index and
first shard). ``kernel/``: a few random inputs for the kernel harness's data provider.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import SHARD_SEPARATOR  # noqa: E402

MAX_SEED_BYTES = 512 * 1024


def _state_dicts() -> dict[str, object]:
    import torch

    torch.manual_seed(0)
    w = torch.randn(3, 4)
    flat = {
        "enc.w": w,
        "enc.tied": w,
        "enc.b": torch.arange(3.0),
        "enc.t": w.t(),
        "enc.slice": w[1:, 2:],
        "enc.expanded": torch.ones(1, 3).expand(4, 3),
        "h": torch.randn(5).half(),
        "bf": torch.randn(2, 2).bfloat16(),
        "d": torch.randn(3, dtype=torch.float64),
        "i": torch.arange(6).reshape(2, 3),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "c": torch.randn(2, dtype=torch.complex64),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.randn(2)),
    }
    nested = {
        "state_dict": OrderedDict([("layer.weight", torch.randn(2, 3)), ("layer.bias", torch.zeros(2))]),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}, "param_groups": []},
        "ema": {"layer.weight": torch.randn(2, 3)},
        "epoch": 7,
        "hparams": {"name": "net", "lr": 1e-3, "betas": (0.9, 0.999), "inf": float("inf"), "big": 2**70},
        "list": [torch.ones(2), {"deep": torch.zeros(1)}],
    }
    return {"flat": flat, "nested": nested, "small": {"w": torch.arange(4.0)}, "bare": torch.ones(3)}


def _torch_bytes(obj: object, legacy: bool, protocol: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    return buf.getvalue()


def _with_ckptscope_metadata(data: bytes) -> bytes:
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{prefix}/ckptscope.json", json.dumps({"ckptscope.source_sha256": "0" * 64, "x": 1}))
    return buf.getvalue()


def _safetensors() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    torch.manual_seed(1)
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(2, 2).half(),
        "bf": torch.randn(3).bfloat16(),
        "mask": torch.tensor([True, False]),
        "u8": torch.arange(3, dtype=torch.uint8),
        "f8": torch.randn(4).to(torch.float8_e5m2),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(1.5),
        "model.layers.0.attn.q_proj.weight": torch.randn(2, 2),
    }
    return {
        "st_dtypes": save(tensors, metadata={"format": "pt", "note": "seed"}),
        "st_one": save({"w": torch.ones(2)}),
    }


def _index(shard: str, names: list[str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 64, "n": [1, 2]}, "weight_map": dict.fromkeys(names, shard)}).encode()


def reader_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, obj in _state_dicts().items():
        for protocol in (2, 4):
            out[f"zip_{name}_p{protocol}"] = _torch_bytes(obj, legacy=False, protocol=protocol)
            out[f"legacy_{name}_p{protocol}"] = _torch_bytes(obj, legacy=True, protocol=protocol)
    out["zip_ckptscope_metadata"] = _with_ckptscope_metadata(out["zip_small_p2"])
    out |= _safetensors()
    st_shard = out["st_one"]
    pt_shard = out["zip_small_p2"]
    out["sharded_safetensors"] = _index("model-00001-of-00001.safetensors", ["w"]) + SHARD_SEPARATOR + st_shard
    out["sharded_torch"] = _index("pytorch_model-00001-of-00001.bin", ["w", "gone"]) + SHARD_SEPARATOR + pt_shard
    out["index_alone"] = _index("model.safetensors", ["w"])
    out |= _issue13_seeds()
    return out


def _issue13_seeds() -> dict[str, bytes]:
    """Whole pickled modules, plain objects beside the weights, quantized and meta tensors, GGUF."""
    import argparse
    import datetime

    import torch

    torch.manual_seed(1)
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2).state_dict()
    objects: dict[str, object] = {
        "whole_module": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)),
        "objects": {
            "model": {"w": torch.randn(2)},
            "args": argparse.Namespace(lr=0.1),
            "when": datetime.datetime(2026, 1, 1),
        },
        "quantized": {
            "q": torch.quantize_per_tensor(torch.randn(3, 4), 0.1, 2, torch.qint8),
            "qc": torch.quantize_per_channel(
                torch.randn(2, 3), torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0, 1]), 0, torch.quint8
            ),
        },
        "meta": meta,
    }
    out: dict[str, bytes] = {}
    for name, obj in objects.items():
        out[f"zip_{name}"] = _torch_bytes(obj, legacy=False, protocol=2)
        out[f"legacy_{name}"] = _torch_bytes(obj, legacy=True, protocol=2)
    out |= _gguf_seeds()
    return out


def _gguf_seeds() -> dict[str, bytes]:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("F32", "F16", "Q8_0", "Q4_0"):
            path = Path(tmp) / f"{qtype}.gguf"
            writer = GGUFWriter(str(path), "llama")
            writer.add_uint32("llama.block_count", 1)
            writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
            values = rng.standard_normal((4, 64)).astype(np.float32)
            kind = GGMLQuantizationType[qtype]
            if qtype == "F16":
                writer.add_tensor("blk.0.w", values.astype(np.float16))
            elif qtype == "F32":
                writer.add_tensor("blk.0.w", values)
            else:
                data = quants.quantize(values, kind)
                writer.add_tensor("blk.0.w", data, raw_shape=data.shape, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            out[f"gguf_{qtype}"] = path.read_bytes()
    return out


def hostile_seeds() -> dict[str, bytes]:
    from tests.hostile_corpus import build_corpus

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        for case in build_corpus(corpus, Path(tmp) / "canaries"):
            paths = [corpus / f for f in case.files]
            if len(paths) == 1:
                data = paths[0].read_bytes() if paths[0].stat().st_size <= MAX_SEED_BYTES else None
            else:
                index = next((p for p in paths if p.name.endswith(".json")), paths[0])
                shards = [p for p in paths if p != index]
                data = index.read_bytes() + (SHARD_SEPARATOR + shards[0].read_bytes() if shards else b"")
                data = data if len(data) <= MAX_SEED_BYTES else None
            if data is not None:
                out[f"hostile_{case.name}"] = data
    return out


MAGIC = 0x1950A86A20F9469CFC6C  # the legacy format's first pickle


def _legacy(obj_pickle: bytes) -> bytes:
    """A legacy checkpoint whose object pickle (the fourth) is ``obj_pickle``, with no storages."""
    head = [MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    return b"".join(pickle.dumps(o, protocol=2) for o in head) + obj_pickle + pickle.dumps([], protocol=2)


def _zip(pkl: bytes, entries: tuple[tuple[str, bytes], ...] = (("archive/data/0", bytes(16)),)) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _patch_central(data: bytes, name: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with one field of ``name``'s central directory record (at ``offset`` in it) set."""
    out = bytearray(data)
    p = out.find(b"PK\x01\x02")
    while p != -1:
        (name_len,) = struct.unpack("<H", out[p + 28 : p + 30])
        if out[p + 46 : p + 46 + name_len] == name:
            out[p + offset : p + offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
            return bytes(out)
        p = out.find(b"PK\x01\x02", p + 4)
    raise ValueError(name)


def _str(text: str) -> bytes:  # BINUNICODE
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


# _rebuild_tensor_v2(<FloatStorage "0" of 4 elements>, 0, (4,), (1,), False, OrderedDict())
_TENSOR = (
    b"ctorch._utils\n_rebuild_tensor_v2\n(("
    + _str("storage")
    + b"ctorch\nFloatStorage\n"
    + _str("0")
    + _str("cpu")
    + b"K\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
)


def _shared_tuples(depth: int, width: int = 64) -> bytes:
    """Protocol-4 opcodes leaving t_depth on the stack, t_k = (t_{k-1},) * width through the memo:
    a few hundred bytes whose hash or repr costs width ** depth."""
    out = b")q\x000"  # () -> memo 0, popped
    for k in range(1, depth + 1):
        out += b"(" + (b"h" + bytes([k - 1])) * width + b"tq" + bytes([k]) + b"0"
    return out + b"h" + bytes([depth])


def probe_seeds() -> dict[str, bytes]:
    """Inputs aimed at classes of reader bugs: each of them raised something other than
    CheckpointError, crashed, hung or changed the reader's state at commit 265dca6."""
    deep = 5000
    plain_zip = _zip(b"\x80\x02}.")
    st_header = json.dumps({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    shard_header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    index = b'{"metadata": {"x": ' + b"[" * 600 + b"]" * 600 + b'}, "weight_map": {"w": "a.safetensors"}}'
    return {
        # a dict key nested 300,000 tuples deep: hashing it recurses in C (stack overflow, SIGSEGV)
        "probe_deep_tuple_key_raw": b"\x80\x02}" + b"(" * 300_000 + b"t" * 300_000 + b"K\x01s.",
        # nested 5,000 deep: repr() of the key, and a plain value of nested frozensets
        "probe_deep_tuple_key_legacy": _legacy(b"\x80\x02}" + b"(" * deep + b"t" * deep + b"K\x01s."),
        "probe_deep_frozenset_value_legacy": _legacy(b"\x80\x04}" + _str("m") + b"(" * deep + b"\x91" * deep + b"s."),
        # shared tuples: 64 ** 5 hashes in a frozenset, hash and repr of a dict key
        "probe_exponential_frozenset_legacy": _legacy(b"\x80\x04}" + _str("m") + b"(" + _shared_tuples(5) + b"\x91s."),
        "probe_exponential_key_legacy": _legacy(b"\x80\x04}" + _shared_tuples(5) + b"K\x01s."),
        # BUILD (None, {...}) on a tensor record: the dataclass __setstate__ overwrites its fields
        "probe_build_on_tensor_record": _zip(
            b"\x80\x02}" + _str("w") + _TENSOR + b"N}" + _str("dtype") + _str("float64") + b"s\x86bs."
        ),
        # BUILD on the process-wide stand-in for torch.FloatStorage: changes every later file
        "probe_build_on_storage_class": b"\x80\x02ctorch\nFloatStorage\n(" + _str("dtype") + b"tb.",
        # zip directory fields zipfile refuses with NotImplementedError, or reads as an allocation
        "probe_zip_version_80": _patch_central(plain_zip, b"archive/data/0", 6, "<H", 80),
        "probe_zip_flag_bit5": _patch_central(plain_zip, b"archive/byteorder", 8, "<H", 0x20),
        "probe_zip_strong_encryption": _patch_central(plain_zip, b"archive/byteorder", 8, "<H", 0x40),
        "probe_zip_compress_size_2_5GB": _patch_central(plain_zip, b"archive/byteorder", 20, "<I", 0x96000006),
        # JSON nested 100,000 deep in ckptscope's own metadata entry
        "probe_zip_ckptscope_json_deep": _zip(
            b"\x80\x02}" + _str("w") + _TENSOR + b"s.",
            (("archive/data/0", bytes(16)), ("archive/ckptscope.json", b"[" * 100_000)),
        ),
        # 600 nested lists in a sharded index's metadata (valid JSON, too deep for the renderer)
        "probe_sharded_metadata_deep": index
        + SHARD_SEPARATOR
        + struct.pack("<Q", len(shard_header))
        + shard_header
        + bytes(4),
        # an unhashable dtype in a safetensors header
        "probe_st_unhashable_dtype": struct.pack("<Q", len(st_header)) + st_header + bytes(4),
    }


def kernel_seeds() -> dict[str, bytes]:
    rng = random.Random(0)
    return {f"random_{i}": rng.randbytes(size) for i, size in enumerate([8, 32, 64, 128, 256, 512, 1024, 4096] * 4)}


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    outdir = Path(sys.argv[1])
    counts = {}
    for folder, seeds in (("readers", reader_seeds() | probe_seeds() | hostile_seeds()), ("kernel", kernel_seeds())):
        (outdir / folder).mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (outdir / folder / name).write_bytes(data)
        counts[folder] = len(seeds)
    sys.stdout.write(f"seeds: {json.dumps(counts)} in {outdir}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
