"""Fuzz the checkpoint readers: arbitrary bytes, written to a file, opened by ``open_checkpoint``.

    python -m fuzz.fuzz_readers [libFuzzer flags] [CORPUS_DIR ...]

The bytes are the file (sniffed by content: safetensors, torch zip, legacy torch pickle, sharded
index JSON, or anything else). An input holding ``SHARD_SEPARATOR`` is a sharded set: the bytes
before it are the index, the bytes after it the shard that every name in its weight_map resolves
to (``fuzz/seeds.py`` writes the seeds that way).

The one acceptable exception is ``CheckpointError`` (any code). Anything else (RecursionError,
TypeError, KeyError, MemoryError, ...) is a finding: it propagates and libFuzzer saves the input.
A listing that opens must be sound: every storage inside its file, every view inside its storage,
known dtypes, a default root that resolves, and a JSON form (what the parse sandbox sends to the
server) without NaN/Inf that reads back to the same listing; an AssertionError otherwise.

After the first input and every 16th, two canary files (a zip and a legacy checkpoint naming
every storage class, dtype marker and helper the unpickler knows) must still read as they did at
start: a reader that keeps state across files (a stand-in rewritten by BUILD) is a finding; the
inputs since the last check are saved (``state-*``) to be replayed one by one.

``CKPTSCOPE_FUZZ_COLLECT=DIR`` (for a survey, not for CI): record each distinct finding (exception
type and the innermost ckptscope frame) in DIR, its first input and traceback, and go on fuzzing.

Bounds: the process's address space is capped at its size after start-up plus
``CKPTSCOPE_FUZZ_MEMORY_MB`` (default 512), so an input that makes a reader allocate more raises
MemoryError (a finding); pass libFuzzer ``-timeout=N`` (and ``-rss_limit_mb``) for time.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import traceback
from collections import Counter, deque
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import SHARD_SEPARATOR  # noqa: E402

with atheris.instrument_imports(include=["ckptscope", "pickle", "zipfile"]):
    import pickle  # instrumented: the restricted unpickler runs pickle._Unpickler
    import zipfile

    from ckptscope.errors import CheckpointError
    from ckptscope.formats import open_checkpoint
    from ckptscope.formats.model import DTYPES, Checkpoint, TensorInfo, checkpoint_from_json, checkpoint_to_json


def _workdir() -> Path:
    """Where each input is written (``CKPTSCOPE_FUZZ_WORKDIR``, kept; else a temp dir). After a
    crash libFuzzer cannot record (a C stack overflow), ``input`` and ``shard`` there are the input
    that crashed. libFuzzer ends with ``_exit`` (no atexit), so temp dirs left by processes that
    are gone are removed at start."""
    if os.environ.get("CKPTSCOPE_FUZZ_WORKDIR"):
        work = Path(os.environ["CKPTSCOPE_FUZZ_WORKDIR"])
        work.mkdir(parents=True, exist_ok=True)
        return work
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    for old in base.glob("ckptscope-fuzz-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"ckptscope-fuzz-{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, work, True)
    return work


WORK = _workdir()
MAIN = WORK / "input"
SHARD = WORK / "shard"


def check_tensor(t: TensorInfo, sizes: dict[str, int]) -> None:
    assert t.dtype in DTYPES, (t.name, t.dtype)
    assert isinstance(t.name, str), t.name
    assert len(t.shape) == len(t.stride) and all(type(v) is int and v >= 0 for v in (*t.shape, *t.stride))
    s = t.storage
    assert s.path in sizes, (t.name, s.path)
    assert type(s.offset) is int and type(s.nbytes) is int, (t.name, s)
    assert 0 <= s.offset and 0 <= s.nbytes and s.offset + s.nbytes <= sizes[s.path], (t.name, s, sizes[s.path])
    assert type(t.storage_offset) is int and t.storage_offset >= 0, (t.name, t.storage_offset)
    if t.numel and (t.plain or t.quant is not None):
        last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride, strict=True))
        assert (last + 1) * t.itemsize <= s.nbytes, (t.name, "view beyond its storage", t)
    if t.encoding is not None and t.encoding != "meta":  # GGUF blocks: the byte range holds them all
        from ckptscope.formats.gguf_format import GGML_TYPES_BY_NAME

        block = GGML_TYPES_BY_NAME[t.encoding]
        assert t.numel % block.block_size == 0 and s.nbytes == t.numel // block.block_size * block.type_size, t


def check_listing(ckpt: Checkpoint, files: set[str]) -> None:
    """What every consumer of a listing relies on."""
    assert isinstance(ckpt, Checkpoint), type(ckpt)
    sizes = {f: os.path.getsize(f) for f in files}
    for t in ckpt.tensors:
        check_tensor(t, sizes)
        for piece in t.pieces:
            check_tensor(piece.info, sizes)
        if t.quant is not None:
            for aux in (t.quant.scales, t.quant.zero_points):
                if aux is not None:
                    check_tensor(aux, sizes)
    ckpt.root_tensors(ckpt.default_root)  # the default root resolves
    for root in ckpt.roots:
        ckpt.root_tensors(root.path)
    text = json.dumps(checkpoint_to_json(ckpt), allow_nan=False)
    again = checkpoint_from_json(json.loads(text))
    assert again == ckpt, "the listing does not survive its JSON form"


# --- canaries: files every input is followed by, read the same way each time ----------------------
# A reader that keeps state between files (BUILD once rewrote the stand-in for torch.FloatStorage
# that every later file shared) reads them differently after the input that changed it.


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _t(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


_OD = _g("collections", "OrderedDict") + b")R"
ITEMSIZE = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1}
ITEMSIZE |= {"Byte": 1, "Bool": 1, "ComplexFloat": 8, "Untyped": 1}


def _storage(cls: str, key: str, numel: int, legacy: bool) -> bytes:
    fields = [_s("storage"), _g("torch", f"{cls}Storage"), _s(key), _s("cpu"), _i(numel)]
    return _t(*fields, b"N" if legacy else b"") + b"Q"


def _canary(legacy: bool) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A state dict naming every storage class (and, in a zip, the dtype markers, tensor
    subclasses and helpers): the object pickle, and each storage's (numel, nbytes)."""
    storages: dict[str, tuple[int, int]] = {}
    items: list[bytes] = []

    def tensor(cls: str, numel: int, builder: str = "v2", dtype: str = "", n: int = 0) -> bytes:
        key = str(len(storages))
        storages[key] = (numel, numel * ITEMSIZE[cls])
        shape, stride = _t(_i(n or numel)), _t(_i(1))
        storage = _storage(cls, key, numel, legacy)
        if builder == "v3":
            args = _t(storage, _i(0), shape, stride, b"\x89", _OD, _g("torch", dtype))
            return _g("torch._utils", "_rebuild_tensor_v3") + args + b"R"
        args = _t(storage, _i(0), shape, stride, b"\x89", _OD)
        if builder == "subclass":
            func, kind = _g("torch._utils", "_rebuild_tensor_v2"), _g("torch.nn.parameter", "Parameter")
            return _g("torch._tensor", "_rebuild_from_type_v2") + _t(func, kind, args, b"}") + b"R"
        v2 = _g("torch._utils", "_rebuild_tensor_v2") + args + b"R"
        return _g("torch._utils", "_rebuild_parameter") + _t(v2, b"\x88", _OD) + b"R" if builder == "param" else v2

    for cls in ITEMSIZE:
        if cls != "Untyped":
            items.append(_s(f"t.{cls}") + tensor(cls, 2))
    items.append(_s("p.weight") + tensor("Float", 3, "param"))
    if not legacy:
        for dtype, itemsize in (("float16", 2), ("bfloat16", 2), ("float", 4), ("half", 2), ("long", 8), ("uint8", 1)):
            items.append(_s(f"v3.{dtype}") + tensor("Untyped", 8, "v3", dtype, 8 // itemsize))
        items.append(_s("sub.weight") + tensor("Float", 2, "subclass"))
        items.append(_s("size") + _g("torch", "Size") + _t(_t(_i(2), _i(3))) + b"R")
        items.append(_s("blob") + _g("_codecs", "encode") + _t(_s("abc"), _s("latin1")) + b"R")
    items.append(_s("epoch") + _i(3))
    return b"\x80\x02}(" + b"".join(items) + b"u.", storages


def canary_files() -> list[Path]:
    pkl, storages = _canary(legacy=False)
    zpath = WORK / "canary.pt"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, (_numel, nbytes) in storages.items():
            zf.writestr(f"archive/data/{key}", bytes(i % 251 for i in range(nbytes)))
    pkl, storages = _canary(legacy=True)
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    data = b"".join(pickle.dumps(o, protocol=2) for o in head) + pkl + pickle.dumps(list(storages), protocol=2)
    for numel, nbytes in storages.values():
        data += struct.pack("<q", numel) + bytes(i % 251 for i in range(nbytes))
    lpath = WORK / "canary.legacy"
    lpath.write_bytes(data)
    return [zpath, lpath]


def listing(path: Path) -> object:
    try:
        return checkpoint_to_json(open_checkpoint(path))
    except CheckpointError as exc:
        return ("refused", exc.code, str(exc))


CANARIES = canary_files()
BASELINE = [listing(p) for p in CANARIES]
CANARY_EVERY = 16  # reading them costs more than an input: after the first input, then every 16th
RECENT: deque[bytes] = deque(maxlen=CANARY_EVERY)
RUNS = [0, 0]  # inputs run, failed canary checks


def check_canaries() -> None:
    for path, before in zip(CANARIES, BASELINE, strict=True):
        if listing(path) != before:
            saved = save_recent() if RUNS[1] == 0 else "(saved the first time)"
            RUNS[1] += 1  # a changed state stays changed: with CKPTSCOPE_FUZZ_COLLECT every later check fails
            raise AssertionError(
                f"the readers now read {path.name} differently: one of the last {len(RECENT)} inputs changed "
                f"their state (saved as {saved}*; replay each alone: python -m fuzz.fuzz_readers FILE)"
            )


def save_recent() -> str:
    """The inputs since the last good canary check, beside libFuzzer's artifacts."""
    prefix = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("-artifact_prefix=")), "./")
    stem = f"{prefix}state-{hashlib.sha1(b''.join(RECENT)).hexdigest()[:12]}-"
    for n, data in enumerate(RECENT):
        Path(f"{stem}{n:02d}").write_bytes(data)
    return stem


def one_input(data: bytes) -> None:
    RECENT.append(data)
    RUNS[0] += 1
    _one_input(data)
    if RUNS[0] % CANARY_EVERY == 1:
        check_canaries()
        RECENT.clear()


def _one_input(data: bytes) -> None:
    index, sep, shard = data.partition(SHARD_SEPARATOR)
    MAIN.write_bytes(index)
    files = {str(MAIN)}
    if sep:
        SHARD.write_bytes(shard)
        files.add(str(SHARD))
    else:
        SHARD.unlink(missing_ok=True)
    try:
        ckpt = open_checkpoint(MAIN, resolve_shard=lambda _name: SHARD if sep else None)
    except CheckpointError as exc:
        assert isinstance(exc.code, str) and exc.code, exc
        return
    check_listing(ckpt, files)


COLLECT = Path(os.environ["CKPTSCOPE_FUZZ_COLLECT"]) if os.environ.get("CKPTSCOPE_FUZZ_COLLECT") else None
SEEN: Counter[str] = Counter()


def signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/ckptscope/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def record(exc: BaseException, data: bytes) -> None:
    assert COLLECT is not None
    sig = signature(exc)
    SEEN[sig] += 1
    if SEEN[sig] == 1:
        name = hashlib.sha1(sig.encode()).hexdigest()[:12]
        COLLECT.mkdir(parents=True, exist_ok=True)
        (COLLECT / f"{name}.bin").write_bytes(data)
        text = "".join(traceback.format_exception(exc))
        (COLLECT / f"{name}.txt").write_text(f"{sig}\n{len(data)} bytes\n\n{text}")
        sys.stderr.write(f"\nFINDING {sig}: {COLLECT / name}.bin\n")
    (COLLECT / "summary.json").write_text(json.dumps(SEEN, indent=1))


def test_one_input(data: bytes) -> None:
    if COLLECT is None:
        one_input(data)
        return
    try:
        one_input(data)
    except Exception as exc:
        record(exc, data)


def cap_memory() -> None:
    extra = int(os.environ.get("CKPTSCOPE_FUZZ_MEMORY_MB", "512")) << 20
    with open("/proc/self/statm") as fh:
        size = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    cap_memory()
    atheris.Fuzz()


if __name__ == "__main__":
    main()
