"""Generate the adversarial corpus: files that try to run code, exhaust memory or crash a parser.

    python -m tests.hostile_corpus OUTDIR [--canary-dir DIR]

writes one file (or folder, for sharded sets) per case and ``corpus.json``: the table of cases,
each with its category and the outcome it must get (``rejected`` with an error code, or
``accepted`` for legal-but-nasty files). Payloads that would execute code run ``touch
CANARY_DIR/<case>`` if they ever ran; ``positive_control`` runs them under plain ``pickle`` in a
throwaway process to prove they are live. Nothing here is committed as a binary.
"""

from __future__ import annotations

import argparse
import io
import json
import operator
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXT_CODE = 240  # an extension-registry code the positive control registers for os.system


@dataclass
class Case:
    name: str
    category: str
    expect: str  # "rejected" | "accepted"
    code: str | None = None  # expected error code when rejected (None: any 4xx)
    files: list[str] = field(default_factory=list)  # relative paths; several for a sharded set
    runs_code: bool = False


class _Reduce:
    def __init__(self, fn: object, args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args

    def __call__(self, *args: object) -> None:  # pickle wants the callable of a reduce to be callable
        raise RuntimeError("only ever pickled")


# --- building blocks --------------------------------------------------------------------------


def _valid_state_dict_zip() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2)}, buf)
    return buf.getvalue()


def _valid_legacy() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _valid_safetensors(tensors: dict[str, object] | None = None, metadata: dict[str, str] | None = None) -> bytes:
    import torch
    from safetensors.torch import save

    return save(tensors or {"a": torch.ones(4), "b": torch.zeros(2, 2)}, metadata=metadata)


def _safetensors_raw(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _torch_zip(entries: list[tuple[str, bytes]], compress: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return buf.getvalue()


def _zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _wrap_in_zip(payload: bytes) -> bytes:
    return _torch_zip([("archive/data.pkl", payload), ("archive/byteorder", b"little"), ("archive/version", b"3\n")])


def _wrap_in_legacy(payload: bytes) -> bytes:
    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    return head + payload + pickle.dumps([], protocol=2)


def _with_data_pkl(transform: Callable[[bytes], bytes]) -> bytes:
    entries = _zip_entries(_valid_state_dict_zip())
    return _torch_zip([(n, transform(d) if n.endswith("data.pkl") else d) for n, d in entries])


# --- code-execution payloads ----------------------------------------------------------------------


def code_payloads(canary: Callable[[str], str]) -> dict[str, bytes]:
    """name -> raw pickle bytes that would create canary(name) if ever executed."""

    def touch(name: str) -> str:
        return f"touch {canary(name)}"

    out: dict[str, bytes] = {}
    out["reduce_os_system"] = pickle.dumps(_Reduce(os.system, (touch("reduce_os_system"),)), protocol=2)
    out["reduce_subprocess"] = pickle.dumps(
        _Reduce(subprocess.Popen, (["touch", canary("reduce_subprocess")],)), protocol=2
    )
    out["reduce_eval"] = pickle.dumps(_Reduce(eval, (f"open({canary('reduce_eval')!r}, 'w').close()",)), protocol=2)
    out["reduce_exec"] = pickle.dumps(_Reduce(exec, (f"open({canary('reduce_exec')!r}, 'w').close()",)), protocol=2)
    os_module = _Reduce(__import__, ("os",))
    out["getattr_chain"] = pickle.dumps(
        _Reduce(_Reduce(getattr, (os_module, "system")), (touch("getattr_chain"),)), protocol=2
    )
    out["methodcaller"] = pickle.dumps(
        _Reduce(operator.methodcaller("system", touch("methodcaller")), (os_module,)), protocol=2
    )
    out["builtins_import_reduce"] = pickle.dumps(
        _Reduce(
            _Reduce(getattr, (_Reduce(__import__, ("subprocess",)), "call")),
            (["touch", canary("builtins_import_reduce")],),
        ),
        protocol=2,
    )
    cmd = touch("inst_opcode").encode()
    out["inst_opcode"] = b"(S'" + cmd + b"'\nios\nsystem\n."
    cmd = touch("obj_opcode").encode()
    out["obj_opcode"] = b"(cos\nsystem\nS'" + cmd + b"'\no."
    cmd = touch("stack_global_memo").encode()
    out["stack_global_memo"] = (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."
    )
    inner = pickle.dumps(_Reduce(os.system, (touch("nested_loads"),)), protocol=2)
    out["nested_loads"] = pickle.dumps(_Reduce(pickle.loads, (inner,)), protocol=2)
    out["stacked_pickles"] = pickle.dumps({"harmless": 1}, protocol=2) + pickle.dumps(
        _Reduce(os.system, (touch("stacked_pickles"),)), protocol=2
    )
    cmd = touch("ext_opcode").encode()
    out["ext_opcode"] = b"\x80\x02\x82" + bytes([EXT_CODE]) + b"X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    out["torch_lookalike_global"] = b"\x80\x02ctorch.serialization\nos\n)R."  # a torch name, not allowed
    return out


# --- the corpus: one builder per category, each a table of rows -------------------------------


@dataclass
class Row:
    """One case as a builder states it: the bytes (or the files of a set) and the answer."""

    name: str
    data: bytes | dict[str, bytes]
    expect: str = "rejected"
    code: str | None = None
    runs_code: bool = False
    filename: str | None = None


@dataclass
class Context:
    canary_dir: Path


def _collectors(rows: list[Row]) -> tuple[Callable[..., None], Callable[..., None]]:
    """``row(name, bytes, ...)`` and ``row_set(name, {file: bytes}, ...)`` append to ``rows``."""

    def row(
        name: str,
        data: bytes,
        expect: str = "rejected",
        code: str | None = None,
        runs_code: bool = False,
        filename: str | None = None,
    ) -> None:
        rows.append(Row(name, data, expect, code, runs_code, filename))

    def row_set(name: str, files: dict[str, bytes], expect: str = "rejected", code: str | None = None) -> None:
        rows.append(Row(name, files, expect, code))

    return row, row_set


# the answer of each payload, raw / in a torch zip / in the legacy format, where it is not
# unsafe_pickle: protocol-0 files do not look like pickles; an EXT code is not registered here;
# stacked pickles: the first is a plain (non-torch) pickle, and data.pkl may hold one pickle only
PAYLOAD_CODES = {
    "inst_opcode": ("unknown_format", "unsafe_pickle", "unsafe_pickle"),
    "obj_opcode": ("unknown_format", "unsafe_pickle", "unsafe_pickle"),
    "stacked_pickles": ("plain_pickle", "corrupt_pickle", "unsafe_pickle"),
    "ext_opcode": ("corrupt_pickle", "corrupt_pickle", "corrupt_pickle"),
}


def pickle_code_execution(ctx: Context) -> list[Row]:
    """Pickle code execution: raw, inside a torch zip, in the legacy format."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    payloads = code_payloads(lambda n: str(ctx.canary_dir / n))
    for pname, payload in payloads.items():
        runs = pname != "torch_lookalike_global"
        raw, zipped, legacy = PAYLOAD_CODES.get(pname, ("unsafe_pickle",) * 3)
        row(f"pickle_{pname}_raw", payload, runs_code=runs, code=raw)
        row(f"pickle_{pname}_zip", _wrap_in_zip(payload), runs_code=runs, code=zipped)
        row(f"pickle_{pname}_legacy", _wrap_in_legacy(payload), runs_code=runs, code=legacy)
    row(
        "pickle_build_on_standin",
        _wrap_in_zip(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fnNs\x86b."),
        code="no_tensors",
    )
    # inert objects since issue 13 (nothing imported or called): without tensors, nothing to read
    row(
        "pickle_whole_module",
        _wrap_in_zip(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81."),
        code="no_tensors",
    )
    row(
        "pickle_numpy_reconstruct",
        _wrap_in_zip(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R."),
        code="no_tensors",
    )
    row(
        "pickle_copyreg_reconstructor",
        _wrap_in_zip(b"\x80\x02ccopyreg\n_reconstructor\n)R."),
        code="no_tensors",
    )
    return rows


def zip_tricks(ctx: Context) -> list[Row]:
    """Zip tricks."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    good = _valid_state_dict_zip()
    entries = _zip_entries(good)
    storages = [n for n, _ in entries if "/data/" in n]
    row(
        "zip_compressed_storage_bomb",
        _torch_zip(
            [(n, bytes(64 << 20) if n == storages[0] else d) for n, d in entries], {storages[0]: zipfile.ZIP_DEFLATED}
        ),
        code="corrupt_zip",
    )
    row(
        "zip_compressed_data_pkl",
        _torch_zip(entries, {"archive/data.pkl": zipfile.ZIP_DEFLATED}),
        code="corrupt_zip",
    )
    row(
        "zip_declared_size_larger",
        _torch_zip([(n, d[:-4] if n == storages[0] else d) for n, d in entries]),
        code="corrupt_zip",
    )
    row("zip_duplicate_names", _torch_zip([*entries, (storages[0], bytes(24))]), code="corrupt_zip")
    mismatch = bytearray(good)
    local = mismatch.find(b"archive/data.pkl")
    mismatch[local : local + 7] = b"ARCHIVE"
    row("zip_local_central_name_mismatch", bytes(mismatch), code="corrupt_zip")
    encrypted = bytearray(good)
    central = encrypted.find(b"PK\x01\x02")
    encrypted[central + 8] |= 1
    row("zip_encrypted_flag", bytes(encrypted), code="corrupt_zip")
    two_sizes = bytearray(good)  # a stored entry whose central record claims 2.5 GB compressed
    record = two_sizes.find(b"PK\x01\x02")
    two_sizes[record + 20 : record + 24] = struct.pack("<I", 0x96000006)
    row("zip_stored_sizes_differ", bytes(two_sizes), code="corrupt_zip")
    row("zip_polyglot_safetensors_then_zip", _valid_safetensors() + good, code="corrupt_safetensors")
    row("zip_junk_prefix", b"#!/bin/sh\necho hi\n" + good, code="unknown_format")
    row("zip_truncated_half", good[: len(good) // 2], code="corrupt_zip")
    row("zip_truncated_central_directory", good[:-30], code="corrupt_zip")
    row(
        "zip_no_data_pkl",
        _torch_zip([(n, d) for n, d in entries if not n.endswith("data.pkl")]),
        code="not_torch_zip",
    )
    row(
        "zip_two_data_pkl",
        _torch_zip([*entries, ("other/data.pkl", b"\x80\x02}.")]),
        code="not_torch_zip",
    )
    row(
        "zip_missing_storage_entry",
        _torch_zip([(n, d) for n, d in entries if n != storages[0]]),
        code="corrupt_zip",
    )
    row(
        "zip_torchscript",
        _torch_zip([*entries, ("archive/constants.pkl", b"\x80\x02).")]),
        code="torchscript",
    )
    row(
        "zip_big_endian",
        _torch_zip([(n, b"big" if n.endswith("byteorder") else d) for n, d in entries]),
        code="unsupported_byteorder",
    )
    row("zip_not_a_checkpoint", _torch_zip([("readme.txt", b"hello")]), code="not_torch_zip")
    row(
        "zip_path_traversal_names",
        _torch_zip([(n.replace("archive/", "../../"), d) for n, d in entries]),
        code="not_torch_zip",
    )
    row("zip_legacy_tar", _tar_bytes(), code="legacy_tar")
    return rows


def safetensors_header(ctx: Context) -> list[Row]:
    """Safetensors header abuse."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    st = _valid_safetensors()
    (hlen,) = struct.unpack("<Q", st[:8])
    row("st_length_beyond_file", struct.pack("<Q", len(st)) + st[8:], code="truncated")
    row("st_length_max_u64", struct.pack("<Q", 2**64 - 1) + st[8:], code="limit_exceeded")
    row(
        "st_header_over_cap",
        struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{" + bytes(16),
        code="limit_exceeded",
    )
    f32 = {"dtype": "F32", "shape": [2]}
    row(
        "st_overlapping",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8]}, "b": f32 | {"data_offsets": [4, 12]}}, bytes(12)),
        code="corrupt_safetensors",
    )
    row(
        "st_gapped",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8]}, "b": f32 | {"data_offsets": [12, 20]}}, bytes(20)),
        code="corrupt_safetensors",
    )
    row(
        "st_huge_shape",
        _safetensors_raw({"a": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    row(
        "st_negative_dim",
        _safetensors_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    row(
        "st_offsets_beyond_data",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8000]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    row(
        "st_negative_offsets",
        _safetensors_raw({"a": f32 | {"data_offsets": [-8, 0]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    row(
        "st_float_offsets",
        _safetensors_raw({"a": f32 | {"data_offsets": [0.0, 8.0]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    row(
        "st_unknown_dtype",
        _safetensors_raw({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        code="unsupported_dtype",
    )
    row(
        "st_duplicate_keys",
        _safetensors_raw(
            None,
            bytes(16),
            raw_header=(
                b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],'
                b'"data_offsets":[8,16]}}'
            ),
        ),
        code="corrupt_safetensors",
    )
    row(
        "st_non_utf8",
        _safetensors_raw(None, b"", raw_header=b'{"\xff\xfe": 1}'),
        code="corrupt_safetensors",
    )
    row(
        "st_deeply_nested_json",
        _safetensors_raw(None, b"", raw_header=b'{"__metadata__": ' + b"[" * 200000 + b"]" * 200000 + b"}"),
        code="corrupt_safetensors",
    )
    row("st_header_is_list", _safetensors_raw([1, 2, 3]), code="unknown_format")
    row(
        "st_metadata_not_strings",
        _safetensors_raw({"__metadata__": {"a": {"b": 1}}, "x": f32 | {"data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(1_000_000)}
    row("st_million_tensors", _safetensors_raw(many), code="limit_exceeded")
    row("st_trailing_bytes", st + b"\x00" * 16, code="corrupt_safetensors")
    row(
        "st_misaligned_offsets",
        _safetensors_raw(
            {
                "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
            },
            bytes(3) + struct.pack("<2f", 1.5, -2.0),
        ),
        expect="accepted",
    )
    row("st_header_truncated", st[: 8 + hlen // 2], code="truncated")
    return rows


def resource_abuse(ctx: Context) -> list[Row]:
    """Resource abuse."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    import torch

    row(
        "res_view_beyond_storage",
        _with_data_pkl(lambda d: d.replace(b"K\x02K\x03\x86", b"M\x00\x10K\x03\x86", 1)),
        code="corrupt_pickle",
    )
    expanded = io.BytesIO()
    torch.save({"e": torch.ones(1).expand(2**20, 4096)}, expanded)  # 2**32 logical elements from 4 bytes
    row("res_stride0_huge_but_legal", expanded.getvalue(), expect="accepted")
    row(
        "res_stride0_beyond_numel_cap",
        _with_data_pkl(
            lambda d: d.replace(b"K\x02K\x03\x86", b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86", 1).replace(
                b"K\x03K\x01\x86", b"K\x00K\x00\x86", 1
            )
        ),
        code="limit_exceeded",
    )
    row("res_giant_memo_index", _wrap_in_zip(b"\x80\x02K\x01r\xff\xff\xff\x7f."), code="no_tensors")
    dag = (
        b"\x80\x02K\x01\x94"
        + b"h\x00h\x00\x86\x94"
        + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86\x94" for i in range(1, 60))
        + b"."
    )
    row("res_exponential_shared_refs", _wrap_in_zip(dag), code="limit_exceeded")
    row(
        "res_deep_nesting",
        _wrap_in_zip(b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."),
        code="corrupt_pickle",
    )
    row(
        "res_huge_unicode_claim",
        _wrap_in_zip(b"\x80\x02X\xff\xff\xff\x7fabc."),
        code="corrupt_pickle",
    )
    legacy = bytearray(_valid_legacy())
    size_at = len(legacy) - 16 - 8
    legacy[size_at : size_at + 8] = struct.pack("<q", 2**40)
    row("res_legacy_storage_size_lie", bytes(legacy), code="corrupt_pickle")
    row(
        "res_long_decimal",
        _wrap_in_zip(b"\x80\x02L" + b"9" * 200000 + b"L\n."),
        code="corrupt_pickle",
    )
    return rows


def sharded_index(ctx: Context) -> list[Row]:
    """Sharded index abuse."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    import torch

    shard = _valid_safetensors({"w": torch.ones(2)})
    index = {"weight_map": {"w": "model-00001.safetensors"}}

    def index_with(target: str) -> bytes:
        return json.dumps({"weight_map": {"w": target}}).encode()

    row_set(
        "shard_path_traversal",
        {"model.safetensors.index.json": index_with("../../etc/passwd"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    row_set(
        "shard_absolute_path",
        {"model.safetensors.index.json": index_with("/etc/passwd"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    row_set(
        "shard_backslash",
        {"model.safetensors.index.json": index_with("..\\..\\x.safetensors"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    row_set(
        "shard_dotdot_name",
        {"model.safetensors.index.json": index_with(".."), "model-00001.safetensors": shard},
        code="bad_index",
    )
    row_set(
        "shard_wrong_format",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001.safetensors": _valid_state_dict_zip(),
        },
        code="bad_index",
    )
    row_set(
        "shard_missing",
        {
            "model.safetensors.index.json": json.dumps(
                {"weight_map": {"w": "model-00001.safetensors", "v": "model-00002.safetensors"}}
            ).encode(),
            "model-00001.safetensors": shard,
        },
        code="missing_shard",
    )
    row_set(
        "shard_unlisted_file",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001.safetensors": shard,
            "extra.bin": b"x" * 10,
        },
        code="unlisted_file",  # a rule of the upload (its files), not of the reader
    )
    row(
        "shard_index_not_json",
        b'{"weight_map": {"w": ',
        filename="shard_index_not_json.json",
        code="bad_index",
    )
    row("shard_index_weight_map_list", b'{"weight_map": ["a", "b"]}', code="not_checkpoint")
    row("shard_index_alone", json.dumps(index).encode(), code="missing_shard")
    return rows


def hostile_names(ctx: Context) -> list[Row]:
    """Hostile names and metadata: legal files whose text must stay inert everywhere."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    import torch

    nasty = [
        "<img src=x onerror=alert(1)>",
        "../../etc/passwd",
        "\u202eexe.txt",
        "{{ 7*7 }}",
        "x" * 10000,
        "<script>alert(1)</script>.weight",
        "'; DROP TABLE tensors; --",
        "zero\u200bwidth",
    ]
    row(
        "names_safetensors",
        _valid_safetensors(
            {n: torch.ones(1) for n in nasty}, {"<b>meta</b>": "{{ 7*7 }}", "note": "\u202e<script>x</script>"}
        ),
        expect="accepted",
    )
    names_zip = io.BytesIO()
    torch.save({n: torch.ones(1) for n in nasty} | {"epoch": "<img src=x onerror=alert(2)>"}, names_zip)
    row("names_torch_zip", names_zip.getvalue(), expect="accepted")
    names_legacy = io.BytesIO()
    torch.save({n: torch.ones(1) for n in nasty[:4]}, names_legacy, _use_new_zipfile_serialization=False)
    row("names_torch_legacy", names_legacy.getvalue(), expect="accepted")
    row(
        "names_client_filename",
        _valid_safetensors(),
        expect="accepted",
        filename="names_client_filename.bin",
    )
    row("names_nul_byte", _valid_safetensors({"a\x00b": torch.ones(1)}), code="bad_name")
    return rows


def truncated_and_random(ctx: Context) -> list[Row]:
    """Truncated and random files."""
    rows: list[Row] = []
    row, row_set = _collectors(rows)
    import random

    rng = random.Random(1234)
    for size in (1, 7, 100, 4096, 1 << 20):
        row(
            f"random_{size}_bytes",
            bytes(rng.getrandbits(8) for _ in range(size)) if size < 5000 else rng.randbytes(size),
            code="unknown_format",
        )
    row("empty_file", b"", code="empty")
    row("pk_then_junk", b"PK\x03\x04" + rng.randbytes(500), code="corrupt_zip")
    row("pickle_proto_then_junk", b"\x80\x02" + rng.randbytes(500), code="corrupt_pickle")
    row(
        "st_len_then_junk",
        struct.pack("<Q", 40) + b"{" + rng.randbytes(60),
        code="corrupt_safetensors",
    )
    legacy_good = _valid_legacy()
    st = _valid_safetensors()
    # cut inside the pickles: the pickle ends early; cut inside the storages: the data does
    storages_at = len(legacy_good) - 4 * 4 - 8
    for cut in (3, 30, len(legacy_good) // 2, storages_at - 40, storages_at - 1):
        row(f"legacy_truncated_{cut}", legacy_good[:cut], code="corrupt_pickle")
    for cut in (storages_at + 4, len(legacy_good) - 3):
        row(f"legacy_truncated_{cut}", legacy_good[:cut], code="truncated")
    # a safetensors file cut inside its header, or inside its data
    (hlen,) = struct.unpack("<Q", st[:8])
    for cut in (9, 8 + hlen // 4, len(st) // 2, 8 + hlen - 1):
        row(f"safetensors_truncated_{cut}", st[:cut], code="truncated" if cut < 8 + hlen else "corrupt_safetensors")
    for cut in (8 + hlen + 1, len(st) - 4, len(st) - 1):
        row(f"safetensors_truncated_{cut}", st[:cut], code="corrupt_safetensors")
    # a torch zip cut anywhere loses its central directory
    zipped = _valid_state_dict_zip()
    for tenth in (1, 2, 3, 4, 6, 7, 8, 9):  # (the half is zip_truncated_half)
        cut = len(zipped) * tenth // 10
        row(f"zip_truncated_{tenth}_tenths", zipped[:cut], code="corrupt_zip")
    return rows


# --- pickle bytes by hand (what producers never write, but a file can say) ----------------------


def pkl_str(text: str, errors: str = "strict") -> bytes:
    raw = text.encode("utf-8", errors)
    return b"X" + len(raw).to_bytes(4, "little") + raw


def pkl_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def pkl_int(value: int) -> bytes:
    return b"J" + value.to_bytes(4, "little", signed=True)


def tensor_data_pkl(
    *,
    storage_class: bytes | None = None,
    offset: bytes | None = None,
    shape: bytes | None = None,
    stride: bytes | None = None,
    after_tensor: bytes = b"",
    builder: str = "_rebuild_tensor_v2",
    extra_args: bytes | None = None,
    name: bytes | None = None,
    numel: bytes | None = None,
    before: bytes = b"",
) -> bytes:
    """``data.pkl`` of ``{"w": <4 float32 values>}`` as torch writes it (protocol 2), each part
    replaceable by hostile bytes."""
    storage = storage_class if storage_class is not None else pkl_global("torch", "FloatStorage")
    count = numel if numel is not None else pkl_int(4)
    pid = b"(" + pkl_str("storage") + storage + pkl_str("0") + pkl_str("cpu") + count + b"tQ"
    dims = shape if shape is not None else b"(" + pkl_int(4) + b"t"
    strides = stride if stride is not None else b"(" + pkl_int(1) + b"t"
    extra = extra_args if extra_args is not None else b"\x89" + pkl_global("collections", "OrderedDict") + b")R"
    first = offset if offset is not None else pkl_int(0)
    args = b"(" + pid + first + dims + strides + extra + b"t"
    tensor = pkl_global("torch._utils", builder) + args + b"R" + after_tensor
    return b"\x80\x02}(" + before + (name if name is not None else pkl_str("w")) + tensor + b"u."


def tensor_zip(data_pkl: bytes, storage: bytes = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)) -> bytes:
    """A torch zip around a hand-made ``data.pkl`` and its one storage (key "0")."""
    return _torch_zip(
        [
            ("archive/data.pkl", data_pkl),
            ("archive/byteorder", b"little"),
            ("archive/data/0", storage),
            ("archive/version", b"3\n"),
        ]
    )


def tensor_legacy(data_pkl: bytes, storage: bytes = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)) -> bytes:
    """The legacy format around a hand-made object pickle: its storage "0" follows the key list."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    numel = len(storage) // 4
    return head + data_pkl + pickle.dumps(["0"], protocol=2) + struct.pack("<q", numel) + storage


def shared_tuples(n: int) -> bytes:
    """Protocol-4 prefix leaving memo[n] = a tuple of 2**n leaves made in n*6 bytes."""
    out = b"\x80\x04)\x94"
    for i in range(1, n + 1):
        out += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86\x94"
    return out


def pickle_machine(ctx: Context) -> list[Row]:
    """BUILD tampering, exponential hashing, deep nesting, wrong types: nothing in a file may
    mutate what was validated or what another file reads, and every step is budgeted."""
    rows: list[Row] = []
    row, _ = _collectors(rows)
    # BUILD on every stand-in a state dict names: recorded, never applied (all read correctly)
    for cls in (
        "FloatStorage",
        "DoubleStorage",
        "HalfStorage",
        "BFloat16Storage",
        "LongStorage",
        "IntStorage",
        "ShortStorage",
        "CharStorage",
        "ByteStorage",
        "BoolStorage",
    ):
        tampered = pkl_global("torch", cls) + b"}(" + pkl_str("dtype") + pkl_str("complex128") + b"ub"
        numel = {"Double": 2, "Long": 2, "Half": 8, "BFloat16": 8, "Short": 8, "Char": 16, "Byte": 16, "Bool": 16}
        count = pkl_int(numel.get(cls.removesuffix("Storage"), 4))
        dims = b"(" + count + b"t"
        row(
            f"machine_build_on_{cls}",
            tensor_zip(tensor_data_pkl(storage_class=tampered, numel=count, shape=dims)),
            expect="accepted",
        )
    for what, target in (
        ("rebuild_function", pkl_global("torch._utils", "_rebuild_tensor_v2")),
        ("ordered_dict", pkl_global("collections", "OrderedDict")),
        ("torch_size", pkl_global("torch", "Size")),
    ):
        state = b"}(" + pkl_str("__defaults__") + b"(" + pkl_int(-1) + b"t" + pkl_str("_fn") + b"Nub"
        data = b"\x80\x02" + target + state + b"0" + tensor_data_pkl()[2:]  # BUILD, POP, then a normal file
        row(f"machine_build_on_{what}", tensor_zip(data), expect="accepted")
    tensor_state = b"}(" + pkl_str("storage_offset") + pkl_int(-1000) + pkl_str("_shape") + b"(" + pkl_int(-1) + b"tub"
    row("machine_build_on_tensor_zip", tensor_zip(tensor_data_pkl(after_tensor=tensor_state)), expect="accepted")
    row("machine_build_on_tensor_legacy", tensor_legacy(tensor_data_pkl(after_tensor=tensor_state)), expect="accepted")
    slot_state = b"N}(" + pkl_str("dtype") + pkl_str("float64") + b"u\x86b"
    row("machine_build_slotstate_zip", tensor_zip(tensor_data_pkl(after_tensor=slot_state)), expect="accepted")

    # shared structures that cost 2**60 steps to hash or unfold, in 360 bytes
    bombs = {
        "dict_key": b"}h\x3cK\x01s",
        "frozenset": b"(h\x3c\x91",
        "set": b"\x8f(h\x3c\x90",
        "dict_opcode": b"(h\x3cK\x01d",
        "list": b"]h\x3ca",
        "ordered_dict_key": pkl_global("collections", "OrderedDict") + b")R(h\x3cK\x01u",
    }
    for what, wrap in bombs.items():
        body = shared_tuples(60) + wrap + b"."
        row(f"machine_bomb_{what}_zip", _wrap_in_zip(body), code="limit_exceeded")
        row(f"machine_bomb_{what}_legacy", _wrap_in_legacy(body), code="limit_exceeded")

    # nesting deeper than any checkpoint, built every way a pickle can nest
    deep = 100_000
    nests = {
        "lists": b"]" * deep + b"a" * (deep - 1),
        "dicts": (b"}" + pkl_str("k")) * deep + b"N" + b"s" * deep,
        "tuples": b"(" * deep + b"N" + b"t" * deep,
        "calls": (pkl_global("torch", "Size") + b"(") * 2000 + b")" + b"tR" * 2000,
        "frozensets": b"(" * deep + b"\x91" * deep,
    }
    for what, body in nests.items():
        row(f"machine_deep_{what}", _wrap_in_zip(b"\x80\x04" + body + b"."), code="corrupt_pickle")

    # wrong types where a tensor's parts belong: validated once, from the finished graph
    wrong = {
        "negative_offset": {"offset": pkl_int(-1)},
        "huge_offset": {"offset": b"\x8a\x08" + (2**62).to_bytes(8, "little")},
        "float_offset": {"offset": b"G" + struct.pack(">d", 1.5)},
        "negative_dim": {"shape": b"(" + pkl_int(-4) + b"t"},
        "string_shape": {"shape": pkl_str("4")},
        "float_stride": {"stride": b"(G" + struct.pack(">d", 1.0) + b"t"},
        "stride_rank_mismatch": {"stride": b"(" + pkl_int(1) + pkl_int(1) + b"t"},
        "view_beyond_storage": {"shape": b"(" + pkl_int(5) + b"t"},
        "too_many_dims": {"shape": b"(" + pkl_int(1) * 65 + b"t", "stride": b"(" + pkl_int(1) * 65 + b"t"},
        "dtype_is_list": {"builder": "_rebuild_tensor_v3", "extra_args": b"\x89N]N"},
        "dtype_is_string": {"builder": "_rebuild_tensor_v3", "extra_args": b"\x89N" + pkl_str("float32") + b"N"},
        "storage_is_int": {"storage_class": pkl_global("torch", "float32")},
        "negative_numel": {"numel": pkl_int(-4)},
        "too_many_args": {"extra_args": b"\x89N" + pkl_int(1) * 6},
        "parameter_of_a_string": {"builder": "_rebuild_parameter", "extra_args": b""},
    }
    for what, parts in wrong.items():
        row(f"machine_wrong_{what}_zip", tensor_zip(tensor_data_pkl(**parts)), code="corrupt_pickle")
        row(f"machine_wrong_{what}_legacy", tensor_legacy(tensor_data_pkl(**parts)), code="corrupt_pickle")

    # malformed machines
    malformed = {
        "setitems_on_nothing": b"\x80\x02(K\x01K\x02K\x03u.",
        "missing_memo": b"\x80\x02K\x01\x94h\x05.",
        "unregistered_extension": b"\x80\x02\x82\x01.",
        "no_stop": b"\x80\x02}K\x01",
        "unknown_opcode": b"\x80\x02N\xff.",
        "stack_underflow": b"\x80\x02R.",
        "additems_on_a_dict": b"\x80\x02}(K\x01\x90.",
        "build_on_empty_stack": b"\x80\x02b.",
        "persistent_id_not_storage": b"\x80\x02" + pkl_str("nope") + b"Q.",
        "tuple_without_mark": b"\x80\x02K\x01t.",
    }
    for what, body in malformed.items():
        row(f"machine_malformed_{what}", _wrap_in_zip(body), code="corrupt_pickle")
    return rows


def text_and_numbers(ctx: Context) -> list[Row]:
    """Lone surrogates, terminal escape sequences, empty and odd safetensors headers."""
    rows: list[Row] = []
    row, _ = _collectors(rows)
    import torch

    one = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    data = struct.pack("<f", 1.0)
    # a lone UTF-16 surrogate cannot be stored or shown as text: refused in a name
    row(
        "text_surrogate_name_safetensors",
        _safetensors_raw(None, data, raw_header=b'{"a\\ud800b":' + json.dumps(one).encode() + b"}"),
        code="bad_name",
    )
    row(
        "text_surrogate_name_zip",
        tensor_zip(tensor_data_pkl(name=pkl_str("w\ud800", "surrogatepass"))),
        code="bad_name",
    )
    row(
        "text_surrogate_name_legacy",
        tensor_legacy(tensor_data_pkl(name=pkl_str("w\udfff", "surrogatepass"))),
        code="bad_name",
    )
    # ... and escaped in metadata, where the file stays readable
    row(
        "text_surrogate_metadata_value",
        _safetensors_raw(
            None, data, raw_header=b'{"__metadata__":{"note":"x\\ud800y"},"a":' + json.dumps(one).encode() + b"}"
        ),
        expect="accepted",
    )
    row(
        "text_surrogate_metadata_key",
        _safetensors_raw(
            None, data, raw_header=b'{"__metadata__":{"k\\udc00":"v"},"a":' + json.dumps(one).encode() + b"}"
        ),
        expect="accepted",
    )
    meta = pkl_str("epoch") + pkl_str("e\ud800", "surrogatepass")
    row("text_surrogate_pickle_metadata", tensor_zip(tensor_data_pkl(before=meta)), expect="accepted")
    # terminal control sequences: inert text everywhere (escaped by the CLI, the UI and the logs)
    sequences = {
        "osc_title": "\x1b]0;pwned\x07",
        "csi_clear": "\x1b[2J\x1b[H",
        "osc52_clipboard": "\x1b]52;c;cm0gLXJmIH4=\x07",
        "c1_csi": "\x9b31m",
        "bell_backspace": "\x07\x08\x08\x08",
    }
    for what, seq in sequences.items():
        name = f"layer{seq}.weight"
        row(f"text_{what}_safetensors", _valid_safetensors({name: torch.ones(1)}, {"note": seq}), expect="accepted")
        zipped = io.BytesIO()
        torch.save({name: torch.ones(1), "note": seq}, zipped)
        row(f"text_{what}_zip", zipped.getvalue(), expect="accepted")
        row(f"text_{what}_legacy", tensor_legacy(tensor_data_pkl(name=pkl_str(name))), expect="accepted")
    # headers the safetensors library reads, and ones it refuses
    row("num_empty_safetensors", _safetensors_raw({}), expect="accepted")
    row("num_only_metadata", _safetensors_raw({"__metadata__": {"format": "pt"}}), expect="accepted")
    for what, meta in (
        ("list", []),
        ("zero", 0),
        ("empty_string", ""),
        ("false", False),
        ("number_value", {"a": 1}),
        ("null_value", {"a": None}),
        ("nested", {"a": ["b"]}),
    ):
        row(
            f"num_metadata_{what}", _safetensors_raw({"__metadata__": meta, "a": one}, data), code="corrupt_safetensors"
        )
    return rows


def payloads_in_sharded_sets(ctx: Context) -> list[Row]:
    """Every code payload as a shard of a sharded torch set: the index is harmless, the shard not."""
    rows: list[Row] = []
    _, row_set = _collectors(rows)
    for pname, payload in code_payloads(lambda n: str(ctx.canary_dir / n)).items():
        index = json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}).encode()
        row_set(
            f"shardset_{pname}",
            {"pytorch_model.bin.index.json": index, "pytorch_model-00001-of-00001.bin": _wrap_in_zip(payload)},
            code=PAYLOAD_CODES.get(pname, ("unsafe_pickle",) * 3)[1],  # the shard's own answer
        )
    return rows


CATEGORIES: list[tuple[str, Callable[[Context], list[Row]]]] = [
    ("pickle code execution", pickle_code_execution),
    ("zip tricks", zip_tricks),
    ("safetensors header", safetensors_header),
    ("resource abuse", resource_abuse),
    ("sharded index", sharded_index),
    ("hostile names", hostile_names),
    ("truncated and random", truncated_and_random),
    ("pickle machine", pickle_machine),
    ("text and numbers", text_and_numbers),
    ("payloads in sharded sets", payloads_in_sharded_sets),
]


def build_corpus(out: Path, canary_dir: Path) -> list[Case]:
    out.mkdir(parents=True, exist_ok=True)
    canary_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(canary_dir)
    cases: list[Case] = []
    for category, builder in CATEGORIES:
        for r in builder(ctx):
            if isinstance(r.data, dict):
                folder = out / r.name
                folder.mkdir(exist_ok=True)
                for fname, data in r.data.items():
                    (folder / fname).write_bytes(data)
                files = [f"{r.name}/{f}" for f in r.data]
            else:
                fname = r.filename or f"{r.name}.bin"
                (out / fname).write_bytes(r.data)
                files = [fname]
            cases.append(Case(r.name, category, r.expect, r.code, files, r.runs_code))
    (out / "corpus.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


def _tar_bytes() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("storages")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    return buf.getvalue()


POSITIVE_CONTROL = r"""
import copyreg, io, json, os, pickle, sys
copyreg.add_extension("os", "system", EXT_CODE)
for path in json.loads(sys.stdin.read()):
    data = open(path, "rb").read()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            pickle.load(stream)
        except Exception:
            break
""".replace("EXT_CODE", str(EXT_CODE))


def positive_control(out: Path, cases: list[Case]) -> None:
    """Run every raw code-execution payload under plain pickle in a throwaway process."""
    raw = [str(out / c.files[0]) for c in cases if c.runs_code and c.name.endswith("_raw")]
    subprocess.run(
        [sys.executable, "-c", POSITIVE_CONTROL],
        input=json.dumps(raw).encode(),
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--canary-dir", type=Path, default=None)
    args = parser.parse_args()
    cases = build_corpus(args.outdir, args.canary_dir or args.outdir / "canaries")
    by_category: dict[str, int] = {}
    for c in cases:
        by_category[c.category] = by_category.get(c.category, 0) + 1
    print(json.dumps({"cases": len(cases), "by_category": by_category}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
