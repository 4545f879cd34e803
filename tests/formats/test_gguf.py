"""GGUF (v2, v3) files written by the real producer, gguf-py's ``GGUFWriter`` (gguf 0.19), read by
ckptscope's own parser and checked against ``gguf.GGUFReader`` + ``gguf.quants.dequantize``; hand-built
hostile files refused fast, with a clear code, without a big allocation; the REST upload and the
export of a quantized selection to safetensors (dequantized), the CLI through its sandbox."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES
from safetensors.torch import load_file

from ckptscope.errors import CheckpointError
from ckptscope.formats import gguf_format, open_checkpoint, sniff
from ckptscope.formats.gguf_format import GGML_TYPES
from tests.helpers import upload, wait_stats

# --- writing GGUF files with the real producer --------------------------------------------------

QUANTIZED_BY_GGUF = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"]  # gguf.quants.quantize
# no numpy quantizer in gguf 0.19: random block bytes of the right size (scales made sane below)
RANDOM_BLOCKS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S"]
RANDOM_BLOCKS += ["IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "NVFP4"]
UNDECODABLE = ["Q8_K", "Q8_1"]  # gguf.quants has no decoder for these
PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32}
PLAIN |= {"I64": np.int64}
TORCH_NAMES = {"F32": "float32", "F16": "float16", "F64": "float64", "BF16": "bfloat16", "I8": "int8"}
TORCH_NAMES |= {"I16": "int16", "I32": "int32", "I64": "int64"}

# byte offsets of each block's float16 scales (d, dmin), as gguf.quants' decoders split blocks
SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
SCALES |= dict.fromkeys(("IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"), (0,))


def encoded(type_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(array for GGUFWriter.add_tensor, raw_dtype) holding ``shape`` values (torch order) of a type."""
    if type_name in PLAIN:
        dtype = PLAIN[type_name]
        if np.issubdtype(dtype, np.integer):
            return rng.integers(-100, 100, shape).astype(dtype), None
        return (rng.standard_normal(shape) * 0.5).astype(dtype), None
    qtype = GGMLQuantizationType[type_name]
    values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if type_name == "BF16" or type_name in QUANTIZED_BY_GGUF:
        return quants.quantize(values, qtype), qtype
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    for offset in SCALES.get(type_name, ()):
        scale = rng.uniform(0.001, 0.05, blocks.shape[:-1]).astype(np.float16)
        blocks[..., offset : offset + 2] = scale.view(np.uint8).reshape(*scale.shape, 2)
    return blocks.reshape(*shape[:-1], -1), qtype


def write_gguf(
    path: Path,
    tensors: list[tuple[str, str, tuple[int, ...]]],
    *,
    seed: int = 0,
    alignment: int | None = None,
    kv: dict[str, tuple[object, GGUFValueType]] | None = None,
    tokens: int = 0,
) -> Path:
    """A GGUF v3 file by GGUFWriter: ``tensors`` as (name, ggml type name, torch-order shape)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_name("tiny test model")
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<tok{i}>" for i in range(tokens)])
        w.add_token_scores([float(-i) for i in range(tokens)])
        w.add_token_types([1] * tokens)
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for name, type_name, shape in tensors:
        data, raw_dtype = encoded(type_name, shape, rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)  # type: ignore[arg-type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor's values (torch order) as gguf-py reads and dequantizes them."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name in UNDECODABLE:
            continue
        if t.tensor_type.name in PLAIN:
            values = np.asarray(t.data)
        else:
            with np.errstate(all="ignore"):  # random blocks may hold NaN scales
                values = quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = values.reshape(tuple(reversed([int(d) for d in t.shape])))
    return out


MODEL_TENSORS = [
    ("token_embd.weight", "Q4_K", (16, 256)),
    ("blk.0.attn_norm.weight", "F32", (256,)),
    ("blk.0.attn_q.weight", "Q8_0", (8, 256)),
    ("blk.0.attn_k.weight", "Q4_0", (4, 256)),
    ("blk.0.attn_v.weight", "Q4_1", (4, 256)),
    ("blk.0.attn_output.weight", "Q5_0", (4, 256)),
    ("blk.0.ffn_gate.weight", "Q5_1", (4, 256)),
    ("blk.0.ffn_up.weight", "Q6_K", (4, 512)),
    ("blk.0.ffn_down.weight", "Q2_K", (2, 3, 256)),  # 3-D: GGUF dims are reversed
    ("blk.1.attn_q.weight", "F16", (4, 64)),
    ("blk.1.attn_k.weight", "BF16", (4, 64)),
    ("blk.1.attn_v.weight", "Q3_K", (2, 256)),
    ("blk.1.ffn_up.weight", "Q5_K", (2, 256)),
    ("blk.1.ffn_down.weight", "IQ4_XS", (2, 256)),
    ("output_norm.weight", "F64", (64,)),
    ("rope_freqs.weight", "F32", (32,)),
    ("positions", "I32", (10,)),
    ("output.weight", "Q8_0", (16, 256)),
]


@pytest.fixture
def model_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", MODEL_TENSORS, tokens=5000)


# --- listing ---------------------------------------------------------------------------------


def test_type_table_is_gguf_s():
    """ckptscope keeps its own copy of ggml's type table (listing imports no gguf): the same."""
    theirs = {int(t): (t.name, *sizes) for t, sizes in GGML_QUANT_SIZES.items()}
    ours = {t.id: (t.name, t.block_size, t.type_size) for t in GGML_TYPES.values()}
    assert ours == theirs
    for t in GGML_TYPES.values():
        assert (t.torch_dtype is None) == (t.name not in TORCH_NAMES), t.name


def test_listing_matches_gguf_reader(model_gguf):
    ckpt = open_checkpoint(model_gguf)
    assert ckpt.format == "gguf" and ckpt.files == [str(model_gguf)]
    theirs = GGUFReader(str(model_gguf)).tensors
    assert [t.name for t in ckpt.tensors] == [t.name for t in theirs] == [n for n, _, _ in MODEL_TENSORS]
    values = reference_values(model_gguf)
    for ours, ref, (_, type_name, shape) in zip(ckpt.tensors, theirs, MODEL_TENSORS, strict=True):
        assert ours.shape == shape == tuple(reversed(ref.shape.tolist())) == values[ours.name].shape
        assert ours.shown_dtype == ours.file_dtype == ref.tensor_type.name == type_name
        assert ours.numel == ref.n_elements and ours.nbytes == ref.n_bytes, ours.name
        assert ours.data_offset == ours.storage.offset == ref.data_offset and ours.storage.nbytes == ref.n_bytes
        assert ours.kind_source == "name" and ours.storage_offset == 0
        if type_name in TORCH_NAMES:
            assert ours.plain and ours.encoding is None and ours.dtype == TORCH_NAMES[type_name]
        else:
            assert ours.encoding == type_name and ours.dtype == "float32" and not ours.plain
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
            assert ours.nbytes == ours.numel // block * size
    kinds = {t.name: t.kind for t in ckpt.tensors}
    assert kinds["blk.0.attn_q.weight"] == "parameter" and kinds["positions"] == "buffer"


def test_metadata_typed_values_and_summarised_arrays(tmp_path):
    nested = [[1, 2], [3, 4, 5]]
    kv = {
        "test.u8": (7, GGUFValueType.UINT8),
        "test.i16": (-3, GGUFValueType.INT16),
        "test.u64": (2**40, GGUFValueType.UINT64),
        "test.i64": (-(2**40), GGUFValueType.INT64),
        "test.f64": (0.1, GGUFValueType.FLOAT64),
        "test.flag": (True, GGUFValueType.BOOL),
        "test.short": ([1, 2, 3], GGUFValueType.ARRAY),
        "test.nested": (nested, GGUFValueType.ARRAY),
        "test.long_text": ("x" * 100_000, GGUFValueType.STRING),
        "tokenizer.ggml.merges": ([f"a{i} b{i}" for i in range(3000)], GGUFValueType.ARRAY),
    }
    path = write_gguf(tmp_path / "m.gguf", [("w", "Q8_0", (2, 32))], kv=kv, tokens=32000)
    meta = open_checkpoint(path).metadata
    assert meta["GGUF.version"] == 3 and meta["GGUF.tensor_count"] == 1
    assert meta["GGUF.kv_count"] == len(GGUFReader(str(path)).fields) - 3  # gguf-py adds 3 GGUF.* fields
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny test model"
    assert meta["llama.context_length"] == 4096 and meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert meta["test.u8"] == 7 and meta["test.i16"] == -3 and meta["test.u64"] == 2**40
    assert meta["test.i64"] == -(2**40) and meta["test.f64"] == 0.1 and meta["test.flag"] is True
    assert meta["test.short"] == [1, 2, 3] and meta["test.nested"] == nested
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens["summary"] == "<array of 32000 str>" and tokens["first"] == [f"<tok{i}>" for i in range(8)]
    assert meta["tokenizer.ggml.scores"]["summary"] == "<array of 32000 f32>"
    assert meta["tokenizer.ggml.scores"]["first"][:3] == [0.0, -1.0, -2.0]
    assert meta["tokenizer.ggml.token_type"]["summary"] == "<array of 32000 i32>"
    assert meta["tokenizer.ggml.merges"]["summary"] == "<array of 3000 str>"
    text = meta["test.long_text"]
    assert text.startswith("x" * 1000) and text.endswith("[100000 bytes in all]") and len(text) < 70_000
    assert len(json.dumps(meta)) < 100_000  # never a dump of the whole vocabulary
    json.dumps(meta, allow_nan=False)


def test_non_finite_metadata_floats_are_json_safe(tmp_path):
    kv = {"test.nan": (float("nan"), GGUFValueType.FLOAT32), "test.inf": (float("-inf"), GGUFValueType.FLOAT64)}
    meta = open_checkpoint(write_gguf(tmp_path / "m.gguf", [("w", "F32", (4,))], kv=kv)).metadata
    assert meta["test.nan"] == "NaN" and meta["test.inf"] == "-Infinity"
    json.dumps(meta, allow_nan=False)


def test_custom_alignment(tmp_path):
    path = write_gguf(
        tmp_path / "a.gguf", [("a", "F32", (3,)), ("b", "Q8_0", (1, 32)), ("c", "F16", (5,))], alignment=64
    )
    ckpt = open_checkpoint(path)
    assert ckpt.metadata["general.alignment"] == 64
    for ours, ref in zip(ckpt.tensors, GGUFReader(str(path)).tensors, strict=True):
        assert ours.data_offset == ref.data_offset and (ours.data_offset - ckpt.tensors[0].data_offset) % 64 == 0


def test_version_2_reads_like_version_3(model_gguf, tmp_path):
    """v2 and v3 share one layout (u64 counts and lengths); v3 only added big-endian files."""
    raw = bytearray(model_gguf.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(raw))
    a, b = open_checkpoint(model_gguf), open_checkpoint(v2)
    assert b.metadata["GGUF.version"] == 2

    def row(t):
        return (t.name, t.dtype, t.shape, t.encoding, t.file_dtype, t.storage.offset, t.storage.nbytes)

    assert [row(t) for t in a.tensors] == [row(t) for t in b.tensors]
    handmade = tmp_path / "v2-hand.gguf"
    handmade.write_bytes(hand_gguf([kv_u32(b"general.alignment", 32)], [tinfo(b"w", [4, 2], 0, 0)], bytes(32), 2))
    (w,) = open_checkpoint(handmade).tensors
    assert w.shape == (2, 4) and w.dtype == "float32" and w.nbytes == 32


def test_123_tensors_are_not_taken_for_safetensors(tmp_path):
    """A tensor count of 123 puts "{" at byte 8, where safetensors' header starts."""
    path = write_gguf(tmp_path / "many.gguf", [(f"t{i}", "F32", (2,)) for i in range(123)])
    assert path.read_bytes()[8:9] == b"{"
    assert sniff(path) == "gguf" and len(open_checkpoint(path).tensors) == 123


def test_gguf_lists_through_the_sandboxed_cli(model_gguf):
    """The CLI parses in the sandbox (no imports once armed): listing a GGUF file works there."""
    out = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "inspect", str(model_gguf), "--json", "--no-stats"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "gguf"
    dtypes = {t["name"]: t["dtype"] for t in data["tensors"]}
    assert dtypes["token_embd.weight"] == "Q4_K" and dtypes["blk.1.attn_k.weight"] == "BF16"


def test_listing_imports_neither_gguf_nor_numpy(model_gguf):
    code = (
        "import sys; from ckptscope.formats import open_checkpoint; "
        f"c = open_checkpoint({str(model_gguf)!r}); "
        "print(len(c.tensors), 'gguf' in sys.modules, 'numpy' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(len(MODEL_TENSORS)), "False", "False", "False"]


# --- hostile files ---------------------------------------------------------------------------


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv_u32(key: bytes, value: int) -> bytes:
    return s(key) + struct.pack("<II", 4, value)


def kv_raw(key: bytes, type_id: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", type_id) + payload


def array(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def tinfo(name: bytes, dims: list[int], type_id: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def header(version: int, n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def hand_gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3, align: int = 32) -> bytes:
    head = header(version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % align) + data


def nested(depth: int) -> bytes:
    inner = array(4, 0)
    for _ in range(depth):
        inner = array(9, 1, inner)
    return inner


F32 = 0
HOSTILE = {
    "truncated-header": (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
    "absurd-tensor-count": (header(3, 2**60, 0) + bytes(76), "limit_exceeded"),
    "tensor-count-past-eof": (header(3, 500_000, 0) + bytes(76), "corrupt_gguf"),
    "absurd-kv-count": (header(3, 0, 2**62) + bytes(76), "limit_exceeded"),
    "kv-count-past-eof": (header(3, 0, 90_000) + bytes(76), "corrupt_gguf"),
    "key-length-past-eof": (header(3, 0, 1) + struct.pack("<Q", 2**62) + bytes(20), "corrupt_gguf"),
    "string-length-past-eof": (hand_gguf([kv_raw(b"k", 8, struct.pack("<Q", 2**40) + b"abc")], []), "corrupt_gguf"),
    "array-count-past-eof": (hand_gguf([kv_raw(b"k", 9, array(0, 2**61))], []), "corrupt_gguf"),
    "array-of-arrays-past-eof": (hand_gguf([kv_raw(b"k", 9, array(9, 2**40))], []), "corrupt_gguf"),
    "string-array-past-eof": (hand_gguf([kv_raw(b"k", 9, array(8, 10**9))], []), "corrupt_gguf"),
    "nested-array-bomb": (hand_gguf([kv_raw(b"k", 9, nested(10_000))], []), "corrupt_gguf"),
    "unknown-value-type": (hand_gguf([kv_raw(b"k", 13, bytes(8))], []), "corrupt_gguf"),
    "unknown-array-item-type": (hand_gguf([kv_raw(b"k", 9, array(99, 1, bytes(8)))], []), "corrupt_gguf"),
    "duplicate-key": (hand_gguf([kv_u32(b"k", 1), kv_u32(b"k", 2)], []), "corrupt_gguf"),
    "alignment-not-power-of-two": (hand_gguf([kv_u32(b"general.alignment", 48)], []), "corrupt_gguf"),
    "alignment-zero": (hand_gguf([kv_u32(b"general.alignment", 0)], []), "corrupt_gguf"),
    "alignment-a-string": (hand_gguf([kv_raw(b"general.alignment", 8, s(b"32"))], []), "corrupt_gguf"),
    "alignment-huge": (hand_gguf([kv_u32(b"general.alignment", 1 << 30)], []), "corrupt_gguf"),
    "offset-outside-file": (hand_gguf([], [tinfo(b"w", [8], F32, 2**40)], bytes(32)), "corrupt_gguf"),
    "data-past-eof": (hand_gguf([], [tinfo(b"w", [1000], F32, 0)], bytes(32)), "corrupt_gguf"),
    "dims-overflow": (hand_gguf([], [tinfo(b"w", [2**32, 2**32, 2**32], F32, 0)], bytes(32)), "corrupt_gguf"),
    "dim-beyond-int64": (hand_gguf([], [tinfo(b"w", [2**63], F32, 0)], bytes(32)), "corrupt_gguf"),
    "misaligned-offset": (hand_gguf([], [tinfo(b"w", [4], F32, 4)], bytes(64)), "corrupt_gguf"),
    "overlapping-tensors": (
        hand_gguf([], [tinfo(b"a", [8], F32, 0), tinfo(b"b", [8], F32, 0)], bytes(32)),
        "corrupt_gguf",
    ),
    "duplicate-tensor": (
        hand_gguf([], [tinfo(b"a", [1], F32, 0), tinfo(b"a", [1], F32, 32)], bytes(64)),
        "corrupt_gguf",
    ),
    "unknown-ggml-type": (hand_gguf([], [tinfo(b"w", [32], 99, 0)], bytes(128)), "unsupported_dtype"),
    "removed-ggml-type": (hand_gguf([], [tinfo(b"w", [32], 4, 0)], bytes(128)), "unsupported_dtype"),
    "row-not-whole-blocks": (hand_gguf([], [tinfo(b"w", [33], 8, 0)], bytes(64)), "corrupt_gguf"),
    "too-many-dims": (hand_gguf([], [tinfo(b"w", [1] * 100, F32, 0)], bytes(32)), "corrupt_gguf"),
    "name-not-utf8": (hand_gguf([], [tinfo(b"\xff\xfe", [1], F32, 0)], bytes(32)), "corrupt_gguf"),
    "name-length-past-eof": (header(3, 1, 0) + struct.pack("<Q", 2**50) + bytes(40), "corrupt_gguf"),
    "tensor-infos-cut": (hand_gguf([], [tinfo(b"w", [4, 4], F32, 0)])[:60], "truncated"),
    "version-1": (header(1, 0, 0) + bytes(40), "unsupported_format"),
    "version-4": (header(4, 0, 0) + bytes(40), "unsupported_format"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + bytes(40), "unsupported_format"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_refused_fast_without_big_allocations(tmp_path, case):
    raw, code = HOSTILE[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(raw)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as err:
            open_checkpoint(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.code == code, (case, err.value.code, err.value.message)
    assert "\n" not in err.value.message and len(err.value.message) < 400
    assert elapsed < 1.0 and peak < 4 << 20, (case, elapsed, peak)


def test_version_messages_say_what_is_supported(tmp_path):
    for case, fragment in [("version-1", "version 1"), ("version-4", "versions 2 and 3"), ("big-endian", "big-endian")]:
        path = tmp_path / "v.gguf"
        path.write_bytes(HOSTILE[case][0])
        with pytest.raises(CheckpointError, match=fragment):
            open_checkpoint(path)


def test_every_cut_of_a_real_file_is_a_clean_refusal(model_gguf, tmp_path):
    raw = model_gguf.read_bytes()
    data_start = open_checkpoint(model_gguf).tensors[0].storage.offset
    cut = tmp_path / "cut.gguf"
    for end in [*range(4, 200, 7), *range(200, data_start, max(1, data_start // 300)), len(raw) - 1]:
        cut.write_bytes(raw[:end])
        with pytest.raises(CheckpointError) as err:
            open_checkpoint(cut)
        assert err.value.code in ("truncated", "corrupt_gguf"), (end, err.value.code, err.value.message)


def test_random_byte_flips_never_crash(model_gguf, tmp_path):
    raw = model_gguf.read_bytes()
    header_end = open_checkpoint(model_gguf).tensors[0].storage.offset
    rng = np.random.default_rng(1)
    bad = tmp_path / "flip.gguf"
    for _ in range(300):
        mutated = bytearray(raw)
        for pos in rng.integers(0, header_end, 3):
            mutated[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(mutated))
        try:
            open_checkpoint(bad)
        except CheckpointError as exc:
            assert exc.code in (
                "truncated",
                "corrupt_gguf",
                "limit_exceeded",
                "unsupported_dtype",
                "unsupported_format",
            )


def test_the_work_budget_bounds_huge_string_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_format, "MAX_ITEMS", 1000)
    strings = b"".join(s(b"t") for _ in range(2000))
    path = tmp_path / "b.gguf"
    path.write_bytes(hand_gguf([kv_raw(b"tokenizer.ggml.tokens", 9, array(8, 2000, strings))], []))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert err.value.code == "limit_exceeded"
    monkeypatch.setattr(gguf_format, "MAX_ITEMS", 10_000)
    assert open_checkpoint(path).metadata["tokenizer.ggml.tokens"]["summary"] == "<array of 2000 str>"


def test_a_wide_array_of_empty_arrays_within_the_file_is_read(tmp_path):
    path = tmp_path / "wide.gguf"
    path.write_bytes(hand_gguf([kv_raw(b"k", 9, array(9, 50_000, array(4, 0) * 50_000))], []))
    started = time.perf_counter()
    assert open_checkpoint(path).metadata["k"] == {"summary": "<array of 50000 array>", "first": [[]] * 8}
    assert time.perf_counter() - started < 2.0


# --- the service: REST upload, stats, export to safetensors ------------------------------------


def test_rest_upload_lists_quantized_types_and_stats(client, model_gguf):
    r = upload(client, model_gguf)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "gguf" and body["tensor_count"] == len(MODEL_TENSORS)
    assert body["total_bytes"] == sum(t.n_bytes for t in GGUFReader(str(model_gguf)).tensors)
    wait_stats(client, body["id"])
    page = client.get(f"/api/v1/checkpoints/{body['id']}/tensors", params={"limit": 100}).json()
    assert page["stats_state"] == "done"
    listed = {t["name"]: t for t in page["tensors"]}
    values = reference_values(model_gguf)
    for name, type_name, shape in MODEL_TENSORS:
        t = listed[name]
        assert t["dtype"] == type_name and t["shape"] == list(shape) and t["numel"] == values[name].size
        x = values[name].astype(np.float64).ravel()
        assert t["stats"]["mean"] == pytest.approx(x.mean(), rel=1e-6, abs=1e-9), name
        assert t["stats"]["max"] == pytest.approx(x.max(), rel=1e-7) and t["stats"]["zeros"] == int((x == 0).sum())
    detail = client.get(f"/api/v1/checkpoints/{body['id']}").json()
    assert detail["metadata"]["tokenizer.ggml.tokens"]["summary"] == "<array of 5000 str>"


def _download(client, checkpoint_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    r = client.get(f"/api/v1/checkpoints/{checkpoint_id}/download")
    assert r.status_code == 200
    path = tmp_path / f"{checkpoint_id}.safetensors"
    path.write_bytes(r.content)
    return load_file(str(path))


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_export_to_safetensors_dequantizes(client, model_gguf, tmp_path, dtype):
    cid = upload(client, model_gguf).json()["id"]
    body = {"include": ["blk.0", "token_embd", "positions"], "format": "safetensors"} | (
        {"dtype": dtype} if dtype else {}
    )
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    want_dtype = dtype or "float32"
    encodings = {"Q4_K": 1, "Q8_0": 1, "Q4_0": 1, "Q4_1": 1, "Q5_0": 1, "Q5_1": 1, "Q6_K": 1, "Q2_K": 1}
    assert out["dequantized"] == {"dtype": want_dtype, "tensors": 8, "encodings": encodings}
    got = _download(client, out["id"], tmp_path)
    values = reference_values(model_gguf)
    assert set(got) == {n for n, _, _ in MODEL_TENSORS if n.startswith(("blk.0.", "token_embd", "positions"))}
    for name, tensor in got.items():
        want = torch.from_numpy(values[name].copy())
        if want.is_floating_point():
            want = want.to(getattr(torch, want_dtype))
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert torch.equal(tensor, want), name
    meta = client.get(f"/api/v1/checkpoints/{out['id']}").json()["metadata"]
    assert json.loads(meta["__metadata__.ckptscope.dequantized"])["tensors"] == 8


def test_export_errors_for_gguf(client, tmp_path):
    path = write_gguf(tmp_path / "u.gguf", [("a", "Q8_K", (1, 256)), ("b", "Q8_0", (1, 32))])
    cid = upload(client, path).json()["id"]
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"dtype": "int8"})
    assert r.status_code == 422
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={})
    assert r.status_code == 422 and "Q8_K" in r.json()["detail"] and "cannot decode" in r.json()["detail"]
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"include": ["b"], "format": "pt"})
    assert r.status_code == 201, r.text
    r = client.get(f"/api/v1/checkpoints/{r.json()['id']}/download")
    pt = tmp_path / "b.pt"
    pt.write_bytes(r.content)
    want = torch.from_numpy(reference_values(path)["b"].copy())
    assert torch.equal(torch.load(pt, weights_only=True)["b"], want)


def test_cli_export_dequantizes_and_says_so(model_gguf, tmp_path):
    out_path = tmp_path / "out.safetensors"
    out = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "export", str(model_gguf), "-o", str(out_path)]
        + ["--include", "output", "--include", "output_norm", "--dtype", "float16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "dequantized 1 quantized tensors (1 Q8_0) to float16" in out.stdout
    got = load_file(str(out_path))
    values = reference_values(model_gguf)
    assert set(got) == {"output.weight", "output_norm.weight"}
    assert torch.equal(got["output.weight"], torch.from_numpy(values["output.weight"].copy()).half())
    assert torch.equal(got["output_norm.weight"], torch.from_numpy(values["output_norm.weight"].copy()).half())


def test_copy_from_and_into_gguf_dequantizes(tmp_path):
    """A GGUF source's values are copied dequantized (cast to the target's dtype, as
    load_state_dict casts); a GGUF target is written as a torch file, its own quantized tensors
    dequantized to float32."""
    from ckptscope.services.operations import copy_report, write_checkpoint

    src_path = write_gguf(tmp_path / "src.gguf", [("blk.0.w", "Q4_0", (4, 64)), ("blk.0.n", "F32", (64,))], seed=1)
    target_sd = {"layer.w": torch.zeros(4, 64, dtype=torch.float16), "layer.n": torch.zeros(64)}
    torch.save(target_sd, tmp_path / "target.pt")
    src, dst = open_checkpoint(src_path), open_checkpoint(tmp_path / "target.pt")
    report = copy_report(src.tensors, dst.tensors, {"blk.0": "layer"})
    assert report.ok and len(report.copied) == 2
    write_checkpoint(tmp_path / "out.pt", report.outputs, "pt", {})
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    values = reference_values(src_path)
    assert got["layer.w"].dtype == torch.float16
    assert torch.equal(got["layer.w"], torch.from_numpy(values["blk.0.w"].copy()).half())
    assert torch.equal(got["layer.n"], torch.from_numpy(values["blk.0.n"].copy()))

    gguf_target = write_gguf(tmp_path / "t.gguf", [("blk.0.w", "Q8_0", (4, 64)), ("blk.1.w", "Q4_K", (1, 256))], seed=2)
    tgt = open_checkpoint(gguf_target)
    report = copy_report(src.tensors, tgt.tensors, {"blk.0.w": "blk.0.w"})
    assert report.ok
    write_checkpoint(tmp_path / "into.pt", report.outputs, "pt", {})
    got = torch.load(tmp_path / "into.pt", weights_only=True)
    assert torch.equal(got["blk.0.w"], torch.from_numpy(values["blk.0.w"].copy()))  # Q4_0 values, as float32
    assert torch.equal(got["blk.1.w"], torch.from_numpy(reference_values(gguf_target)["blk.1.w"].copy()))
