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


# --- the corpus ---------------------------------------------------------------------------------


def build_corpus(out: Path, canary_dir: Path) -> list[Case]:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    canary_dir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(
        name: str,
        category: str,
        data: bytes,
        expect: str = "rejected",
        code: str | None = None,
        runs_code: bool = False,
        filename: str | None = None,
    ) -> None:
        fname = filename or f"{name}.bin"
        (out / fname).write_bytes(data)
        cases.append(Case(name, category, expect, code, [fname], runs_code))

    def add_set(
        name: str, category: str, files: dict[str, bytes], expect: str = "rejected", code: str | None = None
    ) -> None:
        folder = out / name
        folder.mkdir(exist_ok=True)
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        cases.append(Case(name, category, expect, code, [f"{name}/{f}" for f in files]))

    # 1. pickle code execution: raw, inside a torch zip, in the legacy format
    payloads = code_payloads(lambda n: str(canary_dir / n))
    for pname, payload in payloads.items():
        runs = pname != "torch_lookalike_global"
        add(f"pickle_{pname}_raw", "pickle code execution", payload, runs_code=runs)
        add(f"pickle_{pname}_zip", "pickle code execution", _wrap_in_zip(payload), runs_code=runs)
        add(f"pickle_{pname}_legacy", "pickle code execution", _wrap_in_legacy(payload), runs_code=runs)
    add(
        "pickle_build_on_standin",
        "pickle code execution",
        _wrap_in_zip(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fnNs\x86b."),
    )
    add(
        "pickle_whole_module",
        "pickle code execution",
        _wrap_in_zip(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81."),
        code="unsafe_pickle",
    )
    add(
        "pickle_numpy_reconstruct",
        "pickle code execution",
        _wrap_in_zip(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R."),
        code="unsafe_pickle",
    )
    add(
        "pickle_copyreg_reconstructor",
        "pickle code execution",
        _wrap_in_zip(b"\x80\x02ccopyreg\n_reconstructor\n)R."),
        code="unsafe_pickle",
    )

    # 2. zip tricks
    good = _valid_state_dict_zip()
    entries = _zip_entries(good)
    storages = [n for n, _ in entries if "/data/" in n]
    add(
        "zip_compressed_storage_bomb",
        "zip tricks",
        _torch_zip(
            [(n, bytes(64 << 20) if n == storages[0] else d) for n, d in entries], {storages[0]: zipfile.ZIP_DEFLATED}
        ),
        code="corrupt_zip",
    )
    add(
        "zip_compressed_data_pkl",
        "zip tricks",
        _torch_zip(entries, {"archive/data.pkl": zipfile.ZIP_DEFLATED}),
        code="corrupt_zip",
    )
    add(
        "zip_declared_size_larger",
        "zip tricks",
        _torch_zip([(n, d[:-4] if n == storages[0] else d) for n, d in entries]),
        code="corrupt_zip",
    )
    add("zip_duplicate_names", "zip tricks", _torch_zip([*entries, (storages[0], bytes(24))]), code="corrupt_zip")
    mismatch = bytearray(good)
    local = mismatch.find(b"archive/data.pkl")
    mismatch[local : local + 7] = b"ARCHIVE"
    add("zip_local_central_name_mismatch", "zip tricks", bytes(mismatch), code="corrupt_zip")
    encrypted = bytearray(good)
    central = encrypted.find(b"PK\x01\x02")
    encrypted[central + 8] |= 1
    add("zip_encrypted_flag", "zip tricks", bytes(encrypted), code="corrupt_zip")
    add("zip_polyglot_safetensors_then_zip", "zip tricks", _valid_safetensors() + good, code="corrupt_safetensors")
    add("zip_junk_prefix", "zip tricks", b"#!/bin/sh\necho hi\n" + good, code="unknown_format")
    add("zip_truncated_half", "zip tricks", good[: len(good) // 2], code="corrupt_zip")
    add("zip_truncated_central_directory", "zip tricks", good[:-30], code="corrupt_zip")
    add(
        "zip_no_data_pkl",
        "zip tricks",
        _torch_zip([(n, d) for n, d in entries if not n.endswith("data.pkl")]),
        code="not_torch_zip",
    )
    add(
        "zip_two_data_pkl",
        "zip tricks",
        _torch_zip([*entries, ("other/data.pkl", b"\x80\x02}.")]),
        code="not_torch_zip",
    )
    add(
        "zip_missing_storage_entry",
        "zip tricks",
        _torch_zip([(n, d) for n, d in entries if n != storages[0]]),
        code="corrupt_zip",
    )
    add(
        "zip_torchscript",
        "zip tricks",
        _torch_zip([*entries, ("archive/constants.pkl", b"\x80\x02).")]),
        code="torchscript",
    )
    add(
        "zip_big_endian",
        "zip tricks",
        _torch_zip([(n, b"big" if n.endswith("byteorder") else d) for n, d in entries]),
        code="unsupported_byteorder",
    )
    add("zip_not_a_checkpoint", "zip tricks", _torch_zip([("readme.txt", b"hello")]), code="not_torch_zip")
    add(
        "zip_path_traversal_names",
        "zip tricks",
        _torch_zip([(n.replace("archive/", "../../"), d) for n, d in entries]),
        code="not_torch_zip",
    )
    add("zip_legacy_tar", "zip tricks", _tar_bytes(), code="legacy_tar")

    # 3. safetensors header abuse
    st = _valid_safetensors()
    (hlen,) = struct.unpack("<Q", st[:8])
    add("st_length_beyond_file", "safetensors header", struct.pack("<Q", len(st)) + st[8:], code="truncated")
    add("st_length_max_u64", "safetensors header", struct.pack("<Q", 2**64 - 1) + st[8:], code="limit_exceeded")
    add(
        "st_header_over_cap",
        "safetensors header",
        struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{" + bytes(16),
        code="limit_exceeded",
    )
    f32 = {"dtype": "F32", "shape": [2]}
    add(
        "st_overlapping",
        "safetensors header",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8]}, "b": f32 | {"data_offsets": [4, 12]}}, bytes(12)),
        code="corrupt_safetensors",
    )
    add(
        "st_gapped",
        "safetensors header",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8]}, "b": f32 | {"data_offsets": [12, 20]}}, bytes(20)),
        code="corrupt_safetensors",
    )
    add(
        "st_huge_shape",
        "safetensors header",
        _safetensors_raw({"a": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    add(
        "st_negative_dim",
        "safetensors header",
        _safetensors_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    add(
        "st_offsets_beyond_data",
        "safetensors header",
        _safetensors_raw({"a": f32 | {"data_offsets": [0, 8000]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    add(
        "st_negative_offsets",
        "safetensors header",
        _safetensors_raw({"a": f32 | {"data_offsets": [-8, 0]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    add(
        "st_float_offsets",
        "safetensors header",
        _safetensors_raw({"a": f32 | {"data_offsets": [0.0, 8.0]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    add(
        "st_unknown_dtype",
        "safetensors header",
        _safetensors_raw({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        code="unsupported_dtype",
    )
    add(
        "st_duplicate_keys",
        "safetensors header",
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
    add(
        "st_non_utf8",
        "safetensors header",
        _safetensors_raw(None, b"", raw_header=b'{"\xff\xfe": 1}'),
        code="corrupt_safetensors",
    )
    add(
        "st_deeply_nested_json",
        "safetensors header",
        _safetensors_raw(None, b"", raw_header=b'{"__metadata__": ' + b"[" * 200000 + b"]" * 200000 + b"}"),
        code="corrupt_safetensors",
    )
    add("st_header_is_list", "safetensors header", _safetensors_raw([1, 2, 3]), code="unknown_format")
    add(
        "st_metadata_not_strings",
        "safetensors header",
        _safetensors_raw({"__metadata__": {"a": {"b": 1}}, "x": f32 | {"data_offsets": [0, 8]}}, bytes(8)),
        code="corrupt_safetensors",
    )
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(1_000_000)}
    add("st_million_tensors", "safetensors header", _safetensors_raw(many), code="limit_exceeded")
    add("st_trailing_bytes", "safetensors header", st + b"\x00" * 16, code="corrupt_safetensors")
    add(
        "st_misaligned_offsets",
        "safetensors header",
        _safetensors_raw(
            {
                "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
            },
            bytes(3) + struct.pack("<2f", 1.5, -2.0),
        ),
        expect="accepted",
    )
    add("st_header_truncated", "safetensors header", st[: 8 + hlen // 2], code="truncated")

    # 4. resource abuse
    add(
        "res_view_beyond_storage",
        "resource abuse",
        _with_data_pkl(lambda d: d.replace(b"K\x02K\x03\x86", b"M\x00\x10K\x03\x86", 1)),
        code="corrupt_pickle",
    )
    expanded = io.BytesIO()
    torch.save({"e": torch.ones(1).expand(2**20, 4096)}, expanded)  # 2**32 logical elements from 4 bytes
    add("res_stride0_huge_but_legal", "resource abuse", expanded.getvalue(), expect="accepted")
    add(
        "res_stride0_beyond_numel_cap",
        "resource abuse",
        _with_data_pkl(
            lambda d: d.replace(b"K\x02K\x03\x86", b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86", 1).replace(
                b"K\x03K\x01\x86", b"K\x00K\x00\x86", 1
            )
        ),
        code="limit_exceeded",
    )
    add("res_giant_memo_index", "resource abuse", _wrap_in_zip(b"\x80\x02K\x01r\xff\xff\xff\x7f."), code="no_tensors")
    dag = (
        b"\x80\x02K\x01\x94"
        + b"h\x00h\x00\x86\x94"
        + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86\x94" for i in range(1, 60))
        + b"."
    )
    add("res_exponential_shared_refs", "resource abuse", _wrap_in_zip(dag), code="limit_exceeded")
    add(
        "res_deep_nesting",
        "resource abuse",
        _wrap_in_zip(b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."),
        code="corrupt_pickle",
    )
    add(
        "res_huge_unicode_claim",
        "resource abuse",
        _wrap_in_zip(b"\x80\x02X\xff\xff\xff\x7fabc."),
        code="corrupt_pickle",
    )
    legacy = bytearray(_valid_legacy())
    size_at = len(legacy) - 16 - 8
    legacy[size_at : size_at + 8] = struct.pack("<q", 2**40)
    add("res_legacy_storage_size_lie", "resource abuse", bytes(legacy), code="corrupt_pickle")
    add(
        "res_long_decimal",
        "resource abuse",
        _wrap_in_zip(b"\x80\x02L" + b"9" * 200000 + b"L\n."),
        code="corrupt_pickle",
    )

    # 5. sharded index abuse
    shard = _valid_safetensors({"w": torch.ones(2)})
    index = {"weight_map": {"w": "model-00001.safetensors"}}

    def index_with(target: str) -> bytes:
        return json.dumps({"weight_map": {"w": target}}).encode()

    add_set(
        "shard_path_traversal",
        "sharded index",
        {"model.safetensors.index.json": index_with("../../etc/passwd"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    add_set(
        "shard_absolute_path",
        "sharded index",
        {"model.safetensors.index.json": index_with("/etc/passwd"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    add_set(
        "shard_backslash",
        "sharded index",
        {"model.safetensors.index.json": index_with("..\\..\\x.safetensors"), "model-00001.safetensors": shard},
        code="bad_index",
    )
    add_set(
        "shard_dotdot_name",
        "sharded index",
        {"model.safetensors.index.json": index_with(".."), "model-00001.safetensors": shard},
        code="bad_index",
    )
    add_set(
        "shard_wrong_format",
        "sharded index",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001.safetensors": _valid_state_dict_zip(),
        },
        code="bad_index",
    )
    add_set(
        "shard_missing",
        "sharded index",
        {
            "model.safetensors.index.json": json.dumps(
                {"weight_map": {"w": "model-00001.safetensors", "v": "model-00002.safetensors"}}
            ).encode(),
            "model-00001.safetensors": shard,
        },
        code="missing_shard",
    )
    add_set(
        "shard_unlisted_file",
        "sharded index",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001.safetensors": shard,
            "extra.bin": b"x" * 10,
        },
        code=None,
    )
    add(
        "shard_index_not_json",
        "sharded index",
        b'{"weight_map": {"w": ',
        filename="shard_index_not_json.json",
        code="bad_index",
    )
    add("shard_index_weight_map_list", "sharded index", b'{"weight_map": ["a", "b"]}', code="not_checkpoint")
    add("shard_index_alone", "sharded index", json.dumps(index).encode(), code="missing_shard")

    # 6. hostile names and metadata: legal files whose text must stay inert everywhere
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
    add(
        "names_safetensors",
        "hostile names",
        _valid_safetensors(
            {n: torch.ones(1) for n in nasty}, {"<b>meta</b>": "{{ 7*7 }}", "note": "\u202e<script>x</script>"}
        ),
        expect="accepted",
    )
    names_zip = io.BytesIO()
    torch.save({n: torch.ones(1) for n in nasty} | {"epoch": "<img src=x onerror=alert(2)>"}, names_zip)
    add("names_torch_zip", "hostile names", names_zip.getvalue(), expect="accepted")
    names_legacy = io.BytesIO()
    torch.save({n: torch.ones(1) for n in nasty[:4]}, names_legacy, _use_new_zipfile_serialization=False)
    add("names_torch_legacy", "hostile names", names_legacy.getvalue(), expect="accepted")
    add(
        "names_client_filename",
        "hostile names",
        _valid_safetensors(),
        expect="accepted",
        filename="names_client_filename.bin",
    )
    add("names_nul_byte", "hostile names", _valid_safetensors({"a\x00b": torch.ones(1)}), code="bad_name")

    # 7. truncated and random files
    import random

    rng = random.Random(1234)
    for size in (1, 7, 100, 4096, 1 << 20):
        add(
            f"random_{size}_bytes",
            "truncated and random",
            bytes(rng.getrandbits(8) for _ in range(size)) if size < 5000 else rng.randbytes(size),
        )
    add("empty_file", "truncated and random", b"", code=None)
    add("pk_then_junk", "truncated and random", b"PK\x03\x04" + rng.randbytes(500), code="corrupt_zip")
    add("pickle_proto_then_junk", "truncated and random", b"\x80\x02" + rng.randbytes(500))
    add(
        "st_len_then_junk",
        "truncated and random",
        struct.pack("<Q", 40) + b"{" + rng.randbytes(60),
        code="corrupt_safetensors",
    )
    legacy_good = _valid_legacy()
    for cut in (3, 30, len(legacy_good) // 2, len(legacy_good) - 3):
        add(f"legacy_truncated_{cut}", "truncated and random", legacy_good[:cut])
    for cut in (9, len(st) // 2, len(st) - 1):
        add(f"safetensors_truncated_{cut}", "truncated and random", st[:cut])
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
