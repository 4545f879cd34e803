"""torch.distributed.checkpoint (DCP) sets: a pickled ``.metadata`` beside ``__R_N.distcp`` files.

``.metadata`` pickles a ``torch.distributed.checkpoint.metadata.Metadata``: ``state_dict_metadata``
maps each key to a ``TensorStorageMetadata`` (dtype, global size, chunks with offsets and sizes)
or a ``BytesStorageMetadata`` (a non-tensor value); ``storage_data`` maps each chunk's
``MetadataIndex`` (key, chunk offsets) to a filesystem ``_StorageInfo`` (relative file, offset,
length). Each tensor item of a ``.distcp`` file is a complete ``torch.save`` archive of one chunk.

The pickle is read as an inert graph (``pickle_graph``) and interpreted here with our own meaning
of the few DCP classes, torch.Size, dtypes and the layout/memory-format encodings; nothing it names
is imported or called, and any other global refuses the file. Chunks must tile their tensor
exactly; a tensor of several chunks is listed with ``pieces``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from ckptscope.errors import CheckpointError

from .model import (
    DTYPES,
    MAX_DIMS,
    Checkpoint,
    Piece,
    RootInfo,
    StorageRef,
    TensorInfo,
    contiguous_stride,
    tensor_kind,
)
from .pickle_graph import Built, Call, Global, Persistent, SetRecord, WorkBudget, unpickle_graph
from .pickled_tree import PREFERRED_ROOTS, build_checkpoint
from .ranged_path import as_path, is_ranged, will_read
from .torch_pickle import PickledTensor
from .torch_zip import PickleCache, open_torch_archive

FileResolver = Callable[[str], Path | None]

MAX_METADATA_BYTES = 256 * 1024 * 1024
MAX_ENTRIES = 1_000_000  # state dict keys, and storage_data entries
MAX_CHUNKS = 4_000_000  # chunks over all tensors
MAX_FILES = 100_000
MAX_NUMEL = 2**36  # elements in one tensor (as the other readers)
MAX_TILING_STEPS = 20_000_000  # chunk comparisons while checking that chunks tile their tensors
MAX_NESTING = 64  # a Metadata nests about 6 deep
MAX_METADATA_ITEMS = 2000
MAX_ROOT_DEPTH = 2
MAX_NAME = 255

_META = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_OLD_META = "torch.distributed._shard.sharded_tensor.metadata"  # torch < 2.0 spelled some here


class _Class(NamedTuple):
    name: str


class _Func(NamedTuple):
    name: str


class _DType(NamedTuple):
    name: str


class _Layout(NamedTuple):
    name: str


class _MemoryFormat(NamedTuple):
    code: Any


class _Pairs(list[tuple[Any, Any]]):
    """A pickled dict as the list of its pairs (keys stay records; nothing is hashed)."""


class _Obj:
    """An instance of one of the DCP classes: its class and its BUILD state (interpreted)."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: str) -> None:
        self.cls = cls
        self.state: Any = None


# torch dtype names a .metadata may name beyond those ckptscope reads (refused later as unsupported)
_OTHER_DTYPES = (
    "complex32 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 qint8 quint8 qint32 "
    "quint4x2 quint2x4 bits8 bits16 bits1x8 bits2x4 bits4x2 uint1 uint2 uint3 uint4 uint5 uint6 uint7 "
    "int1 int2 int3 int4 int5 int6 int7"
).split()


def _known_globals() -> dict[tuple[str, str], Any]:
    known: dict[tuple[str, str], Any] = {}
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    ):
        known[(_META, name)] = _Class(name)
    known[(_OLD_META, "TensorProperties")] = _Class("TensorProperties")
    known[(_FS, "_StorageInfo")] = _Class("_StorageInfo")
    known[("torch", "Size")] = _Func("Size")
    known[("torch.serialization", "_get_layout")] = _Func("layout")
    known[(_META, "_MEM_FORMAT_ENCODING")] = _Func("memory_format")
    known[(_OLD_META, "MEM_FORMAT_ENCODING")] = _Func("memory_format")
    known[("collections", "OrderedDict")] = _Func("dict")
    for cls in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        known[("pathlib", cls)] = _Func("path")  # StorageMeta.checkpoint_id: shown as text, never built
    for dtype in (*DTYPES, *_OTHER_DTYPES):
        known[("torch", dtype)] = _DType(dtype)
    for layout in (
        "strided",
        "sparse_coo",
        "sparse_csr",
        "sparse_csc",
        "sparse_bsr",
        "sparse_bsc",
        "_mkldnn",
        "jagged",
    ):
        known[("torch", layout)] = _Layout(layout)
    return known


_GLOBALS = _known_globals()


def _refusal(module: str, name: str) -> CheckpointError | None:
    if (module, name) in _GLOBALS:
        return None
    return CheckpointError(
        "unsafe_pickle",
        f"refused to load: the .metadata names {module}.{name}, which is not part of a "
        "torch.distributed.checkpoint metadata file; pickled code is never run"[:400],
    )


def _corrupt(message: str) -> CheckpointError:
    return CheckpointError("corrupt_dcp", message[:400])


def _chunks_error(message: str) -> CheckpointError:
    return CheckpointError("dcp_chunks", message[:400])


_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})
_MISSING = object()


class _Interpreter:
    """The graph of a ``.metadata`` as plain values and ``_Obj`` records; each node once, every
    step charged to the file's budget."""

    def __init__(self, budget: WorkBudget) -> None:
        self.budget = budget
        self.done: dict[int, Any] = {}

    def value(self, node: Any, depth: int = 0) -> Any:
        kind = type(node)
        if kind in _PLAIN:
            return node
        known = self.done.get(id(node), _MISSING)
        if known is not _MISSING:
            return known
        if depth > MAX_NESTING:
            raise _corrupt("the .metadata nests too deeply for a torch.distributed.checkpoint metadata file")
        self.budget.spend()
        out: Any
        if kind is list or kind is SetRecord:
            items = node if kind is list else node.items
            self.budget.spend(len(items))
            out = []
            self.done[id(node)] = out  # a list may contain itself
            out.extend(self.value(v, depth + 1) for v in items)
        elif kind is tuple:
            self.budget.spend(len(node))
            out = tuple(self.value(v, depth + 1) for v in node)
        elif kind is dict:
            self.budget.spend(len(node))
            out = _Pairs()
            self.done[id(node)] = out
            out.extend((self.value(k, depth + 1), self.value(v, depth + 1)) for k, v in node.items())
        elif kind is Global:
            out = _GLOBALS[node.key]  # the unpickler refused every other global
        elif kind is Call:
            out = self._call(node, depth)
        elif kind is Built:
            out = self.value(node.target, depth + 1)  # the state of a plain container is not applied
        elif kind is Persistent:
            raise _corrupt("the .metadata holds a persistent id (a storage); metadata files have none")
        else:
            out = f"<{kind.__name__}>"
        self.done[id(node)] = out
        return out

    def _call(self, node: Call, depth: int) -> Any:
        func = self.value(node.func, depth + 1)
        if node.kwargs:
            raise _corrupt("the .metadata builds an object with keyword arguments")
        if isinstance(func, _Class):
            if node.items or node.appended or self.value(node.args, depth + 1) != ():
                raise _corrupt(f"the .metadata builds a {func.name} in a way torch never writes")
            obj = _Obj(func.name)
            self.done[id(node)] = obj
            states = node.states or []
            if len(states) > 1:
                raise _corrupt(f"the .metadata sets the state of a {func.name} twice")
            if states:
                obj.state = self.value(states[0], depth + 1)
            return obj
        if not isinstance(func, _Func):
            raise _corrupt("the .metadata calls something that is not a class or function of DCP metadata")
        args = self.value(node.args, depth + 1)
        if not isinstance(args, tuple) or node.appended or (node.items and func.name != "dict"):
            raise _corrupt(f"the .metadata calls {func.name} with malformed arguments")
        return _FUNCTIONS[func.name](
            args, [(self.value(k, depth + 1), self.value(v, depth + 1)) for k, v in node.items or ()]
        )


def _size(args: tuple[Any, ...], _items: list[tuple[Any, Any]]) -> tuple[int, ...]:
    if not args:
        return ()
    if len(args) != 1:
        raise _corrupt("torch.Size is built from more than one value")
    return _int_tuple(args[0], "a torch.Size")


def _layout(args: tuple[Any, ...], _items: list[tuple[Any, Any]]) -> _Layout:
    if len(args) != 1 or not isinstance(args[0], str) or len(args[0]) > 64:
        raise _corrupt("a tensor layout is not named")
    return _Layout(args[0].removeprefix("torch."))


def _memory_format(args: tuple[Any, ...], _items: list[tuple[Any, Any]]) -> _MemoryFormat:
    if len(args) != 1 or type(args[0]) is not int:
        raise _corrupt("a memory format is not one of DCP's codes")
    return _MemoryFormat(args[0])


def _ordered_dict(args: tuple[Any, ...], items: list[tuple[Any, Any]]) -> _Pairs:
    out = _Pairs()
    if args:
        if len(args) != 1 or not isinstance(args[0], list | _Pairs):
            raise _corrupt("an OrderedDict is built from something that is not its items")
        for pair in args[0]:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise _corrupt("an OrderedDict is built from something that is not pairs")
            out.append(pair)
    out.extend(items)
    return out


def _path(args: tuple[Any, ...], _items: list[tuple[Any, Any]]) -> str:
    if not all(isinstance(a, str) for a in args) or sum(len(a) for a in args) > 4096:
        raise _corrupt("a path in the .metadata is not text")
    return str(PurePosixPath(*args)) if args else "."


_FUNCTIONS: dict[str, Callable[[tuple[Any, ...], list[tuple[Any, Any]]], Any]] = {
    "Size": _size,
    "layout": _layout,
    "memory_format": _memory_format,
    "dict": _ordered_dict,
    "path": _path,
}


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_DIMS:
        raise _corrupt(f"{what} is not a tuple of at most {MAX_DIMS} integers")
    for v in value:
        if type(v) is not int or v < 0:
            raise _corrupt(f"{what} holds a negative or non-integer value")
    return tuple(value)


def _fields(obj: Any, cls: str, what: str) -> dict[str, Any]:
    """The fields of a pickled dataclass instance (its BUILD state: a dict, or (dict, slots))."""
    if not isinstance(obj, _Obj) or obj.cls != cls:
        raise _corrupt(f"{what} is not a {cls}")
    state = obj.state
    if state is None:
        return {}
    parts: list[Any] = list(state) if isinstance(state, tuple) and len(state) == 2 else [state]
    out: dict[str, Any] = {}
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, _Pairs):
            raise _corrupt(f"{what}: the state of its {cls} is not a dict of fields")
        for key, value in part:
            if type(key) is not str:
                raise _corrupt(f"{what}: a field name of its {cls} is not text")
            out[key] = value
    return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 * 1024:
        raise _corrupt(f"{what} is not a non-empty string")
    return value


def validate_relative_path(name: Any) -> str:
    """A ``.distcp`` name from ``storage_data``: a plain file name inside the checkpoint directory."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise _corrupt("storage_data names an empty, overlong or non-string file")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..", ".metadata"):
        raise _corrupt(
            f"storage_data names the file {name[:100]!r}; DCP files are plain names in the checkpoint directory"
        )
    if PurePosixPath(name).is_absolute():
        raise _corrupt(f"storage_data names the file {name[:100]!r}, an absolute path")
    return name


@dataclass(frozen=True, slots=True)
class _Item:
    file: str  # relative name of the .distcp file
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def _storage_items(storage_data: Any, budget: WorkBudget) -> dict[tuple[str, tuple[int, ...] | None], _Item]:
    if not isinstance(storage_data, _Pairs):
        raise _corrupt("storage_data is not the dict of file ranges the filesystem writer stores")
    if len(storage_data) > MAX_ENTRIES:
        raise CheckpointError("limit_exceeded", f"storage_data has more than {MAX_ENTRIES} entries")
    items: dict[tuple[str, tuple[int, ...] | None], _Item] = {}
    for key, info in storage_data:
        budget.spend()
        index = _fields(key, "MetadataIndex", "a storage_data key")
        fqn = _text(index.get("fqn"), "a storage_data key's fqn")
        offset = index.get("offset")
        offsets = None if offset is None else _int_tuple(offset, f"the chunk offsets of {fqn[:100]!r}")
        where = f"the storage entry of {fqn[:100]!r}"
        fields = _fields(info, "_StorageInfo", where)
        name = validate_relative_path(fields.get("relative_path"))
        start, length = fields.get("offset"), fields.get("length")
        if type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise _corrupt(f"{where} has a negative or non-integer byte range")
        transforms = fields.get("transform_descriptors")
        if transforms:
            shown = ", ".join(str(t)[:40] for t in transforms) if isinstance(transforms, list | tuple) else "?"
            raise CheckpointError(
                "unsupported_format",
                f"{where} is stored through transforms ({shown}, e.g. compression); they are not supported"[:400],
            )
        if (fqn, offsets) in items:
            raise _corrupt(f"storage_data lists {where[4:]} twice")
        items[(fqn, offsets)] = _Item(name, start, length)
    return items


def _check_tiling(name: str, size: tuple[int, ...], chunks: list[_Chunk], steps: list[int]) -> None:
    """Chunks (non-empty, inside the tensor) must not overlap and must cover every element. A sweep
    along the dimension with the most distinct chunk starts compares only chunks that meet there."""
    if not size:
        if len(chunks) > 1:
            raise _chunks_error(f"tensor {name!r} is 0-d but has {len(chunks)} chunks")
    elif len(chunks) > 1:
        dim = max(range(len(size)), key=lambda d: len({c.offsets[d] for c in chunks}))
        active: list[_Chunk] = []
        for chunk in sorted(chunks, key=lambda c: c.offsets[dim]):
            start = chunk.offsets[dim]
            active = [a for a in active if a.offsets[dim] + a.sizes[dim] > start]
            steps[0] += len(active) + 1
            if steps[0] > MAX_TILING_STEPS:
                raise CheckpointError(
                    "limit_exceeded",
                    "checking that the chunks tile their tensors takes too long (too many overlapping chunks)",
                )
            for other in active:
                if all(
                    o < c + s and c < o + t
                    for o, t, c, s in zip(other.offsets, other.sizes, chunk.offsets, chunk.sizes, strict=True)
                ):
                    raise _chunks_error(
                        f"tensor {name!r}: chunks at offsets {list(other.offsets)} and {list(chunk.offsets)} overlap"
                    )
            active.append(chunk)
    covered = sum(c.numel for c in chunks)
    if covered != math.prod(size):
        raise _chunks_error(f"tensor {name!r}: its chunks cover {covered} of its {math.prod(size)} elements (a gap)")


class _Files:
    """The ``.distcp`` files named by the metadata, resolved once, with their sizes."""

    def __init__(self, resolve: FileResolver) -> None:
        self._resolve = resolve
        self.paths: dict[str, Path] = {}
        self.sizes: dict[str, int] = {}

    def path(self, item: _Item) -> Path:
        path = self.paths.get(item.file)
        if path is None:
            if len(self.paths) >= MAX_FILES:
                raise CheckpointError("limit_exceeded", f"the checkpoint names more than {MAX_FILES} files")
            found = self._resolve(item.file)
            if found is None or not found.is_file():
                raise CheckpointError(
                    "missing_shard", f"file {item.file[:100]!r} named by the .metadata was not provided"
                )
            path = self.paths[item.file] = found
            self.sizes[item.file] = found.stat().st_size
        if item.offset + item.length > self.sizes[item.file]:
            raise _corrupt(
                f"an item at bytes {item.offset}..{item.offset + item.length} lies outside {item.file[:100]!r} "
                f"({self.sizes[item.file]} bytes)"
            )
        return path


def _will_read_items(resolve: FileResolver, items: Iterable[_Item]) -> None:
    """Tell each ranged file the ends of its items (an item's archive keeps its directory at its
    end, its data.pkl and local headers at its start)."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for item in items:
        edge = min(item.length, _ITEM_EDGE)
        by_file.setdefault(item.file, []).extend(
            [(item.offset, item.offset + edge), (item.offset + item.length - edge, item.offset + item.length)]
        )
    for name, ranges in list(by_file.items())[:MAX_FILES]:
        path = resolve(name)
        if path is not None:
            will_read(path, ranges)


_ITEM_EDGE = 4096


def _check_items_disjoint(items: Iterable[_Item]) -> None:
    by_file: dict[str, list[_Item]] = {}
    for item in items:
        by_file.setdefault(item.file, []).append(item)
    for name, ranges in by_file.items():
        ranges.sort(key=lambda i: i.offset)
        for a, b in zip(ranges, ranges[1:], strict=False):
            if a.offset + a.length > b.offset:
                raise _corrupt(f"two items of {name[:100]!r} share bytes (at {b.offset})")


def _in_item(item: _Item, what: str, error: CheckpointError) -> CheckpointError:
    code = "corrupt_dcp" if error.code == "dcp_shard" else error.code
    message = "its bytes hold more than one archive" if error.code == "dcp_shard" else error.message
    return CheckpointError(code, f"{what} in {item.file[:100]!r} at byte {item.offset}: {message}"[:400])


def _read_chunk(path: Path, item: _Item, name: str, dtype: str, chunk: _Chunk, pickles: PickleCache) -> TensorInfo:
    what = f"the chunk of {name!r} at {list(chunk.offsets)}"
    try:
        with open_torch_archive(path, item.offset, item.length, f"@{item.offset}/", pickles) as archive:
            if not isinstance(archive.obj, PickledTensor):
                raise _corrupt("the item is not a saved tensor")
            listed = build_checkpoint(archive.obj, "torch-zip", archive.locate, [str(path)]).tensors
    except CheckpointError as exc:
        raise _in_item(item, what, exc) from None
    info = listed[0]
    if info.dtype != dtype or info.shape != chunk.sizes:
        raise _chunks_error(
            f"{what} holds a {info.dtype} tensor of shape {list(info.shape)}, but the metadata says "
            f"{dtype} of shape {list(chunk.sizes)}"
        )
    if info.storage.path != str(path):
        raise _corrupt(f"{what} has no data in its file")
    return info._replace(name=name, kind=tensor_kind(name, dtype), kind_source="name", alias_of=None)


_NOT_PLAIN = object()


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe rendering of a value read from a bytes item, or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value[:1000]
    if isinstance(value, int):
        return value if abs(value) <= 2**63 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple) and len(value) <= 64 and depth < 2:
        items = [_plain(v, depth + 1) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _read_bytes_item(path: Path, item: _Item, name: str, warnings: list[str], pickles: PickleCache) -> Any:
    """What a non-tensor item holds, when it is a plain value; a note saying its size otherwise.
    ``torch.distributed.checkpoint.load`` unpickles these items with ``weights_only=False``, so one
    whose pickle names a global that could run code refuses the checkpoint."""
    note = f"<bytes item, {item.length} bytes>"
    with path.open("rb") as fh:
        fh.seek(item.offset)
        if fh.read(4) != b"PK\x03\x04":
            return note
    try:
        with open_torch_archive(path, item.offset, item.length, pickle_cache=pickles) as archive:
            obj = archive.obj
    except CheckpointError as exc:
        if exc.code in ("unsafe_pickle", "limit_exceeded"):
            raise _in_item(item, f"the non-tensor item {name!r}", exc) from None
        warnings.append(f"the non-tensor item {name!r} could not be read: {exc.message}"[:300])
        return note
    value = _plain(obj)
    return note if value is _NOT_PLAIN else value


def _roots(names: list[str], planner_data: Any) -> tuple[list[RootInfo], str]:
    """Roots from the saved state dict's nesting: the planner's key paths where it stored them
    (``{"model": {...}, "optim": {...}}`` flattened to ``model.x``: path ``("model", "x")``), else
    the first part of each dotted key."""
    paths: dict[str, tuple[str, ...]] = {}
    if isinstance(planner_data, _Pairs) and len(planner_data) <= MAX_ENTRIES:
        for key, path in planner_data:
            if (
                isinstance(key, str)
                and isinstance(path, tuple | list)
                and 0 < len(path) <= MAX_DIMS
                and all(isinstance(p, str | int) and not isinstance(p, bool) for p in path)
            ):
                parts = tuple(str(p) for p in path)
                if ".".join(parts) == key:
                    paths[key] = parts
    bearing: dict[str, int] = {}
    for name in names:
        parts = paths.get(name) or tuple(name.split(".", 1))
        for depth in range(0, min(len(parts) - 1, MAX_ROOT_DEPTH) + 1):
            prefix = ".".join(parts[:depth])
            bearing[prefix] = bearing.get(prefix, 0) + 1
    roots = [RootInfo(path, count) for path, count in bearing.items()]
    roots.sort(key=lambda r: (r.path.count("."), r.path != "", r.path))
    known = {r.path for r in roots}
    default = next((key for key in PREFERRED_ROOTS if key in known), "")
    return roots, default


def is_dcp_metadata(path: str | Path) -> bool:
    """Whether a file starts like a pickled DCP ``Metadata`` (the reader checks everything else)."""
    with as_path(path).open("rb") as fh:
        head = fh.read(160)
    return (
        head[:1] == b"\x80"
        and _META.encode() in head
        and (b"\x8c\x08Metadata" in head or b"\nMetadata\n" in head or b"X\x08\x00\x00\x00Metadata" in head)
    )


def read_dcp(metadata_path: str | Path, resolve_file: FileResolver | None = None) -> Checkpoint:
    """List a DCP checkpoint from its ``.metadata``; ``resolve_file`` finds each ``.distcp`` file
    by its relative name (by default: beside the metadata, see ``directory_resolver``)."""
    metadata_path = as_path(metadata_path)
    resolve = resolve_file or directory_resolver(metadata_path.parent)
    if metadata_path.stat().st_size > MAX_METADATA_BYTES:
        raise CheckpointError("limit_exceeded", "the .metadata is larger than the 256 MiB limit")
    data = metadata_path.read_bytes()
    budget = WorkBudget.for_bytes(len(data))
    graph = unpickle_graph(data, budget, _refusal)
    try:
        meta = _fields(_Interpreter(budget).value(graph), "Metadata", "the .metadata")
    except RecursionError:
        raise _corrupt("the .metadata nests too deeply") from None
    entries = meta.get("state_dict_metadata")
    if not isinstance(entries, _Pairs):
        raise _corrupt("the .metadata has no state_dict_metadata dict")
    if len(entries) > MAX_ENTRIES:
        raise CheckpointError("limit_exceeded", f"the .metadata lists more than {MAX_ENTRIES} keys")
    items = _storage_items(meta.get("storage_data"), budget)
    _check_items_disjoint(items.values())
    files = _Files(resolve)
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    warnings: list[str] = []
    seen: set[str] = set()
    used: set[tuple[str, tuple[int, ...] | None]] = set()
    total_chunks = 0
    steps = [0]
    pickles: PickleCache = {}  # chunk archives mostly hold the same data.pkl: read each once
    if is_ranged(metadata_path):  # in a store: both ends of every item fetched in one round
        _will_read_items(resolve, items.values())
    for fqn, entry in entries:
        budget.spend()
        name = _text(fqn, "a state_dict_metadata key")
        if name in seen:
            raise _corrupt(f"state_dict_metadata lists {name[:100]!r} twice")
        seen.add(name)
        if isinstance(entry, _Obj) and entry.cls == "BytesStorageMetadata":
            item = items.get((name, None))
            used.add((name, None))
            if item is None:
                warnings.append(f"the non-tensor item {name[:100]!r} has no storage entry"[:300])
            else:  # each is read (one that could run code refuses the set); the first ones are shown
                value = _read_bytes_item(files.path(item), item, name, warnings, pickles)
                if len(metadata) < MAX_METADATA_ITEMS:
                    metadata[name] = value
            continue
        fields = _fields(entry, "TensorStorageMetadata", f"the metadata of {name[:100]!r}")
        dtype = _dtype(fields.get("properties"), name)
        size = _int_tuple(fields.get("size"), f"the size of {name[:100]!r}")
        if math.prod(size) > MAX_NUMEL:
            raise CheckpointError(
                "limit_exceeded", f"tensor {name[:100]!r} declares {math.prod(size)} elements (limit 2**36)"
            )
        raw_chunks = fields.get("chunks")
        if not isinstance(raw_chunks, list):
            raise _corrupt(f"the chunks of {name[:100]!r} are not a list")
        total_chunks += len(raw_chunks)
        if total_chunks > MAX_CHUNKS:
            raise CheckpointError("limit_exceeded", f"the .metadata lists more than {MAX_CHUNKS} chunks")
        budget.spend(len(raw_chunks) * (1 + len(size)))  # each chunk's offsets and sizes are checked
        chunks = [_chunk(c, name, size) for c in raw_chunks]
        filled = [c for c in chunks if c.numel]
        used.update((name, c.offsets) for c in chunks if not c.numel)  # empty chunks: nothing to read
        _check_tiling(name, size, filled, steps)
        pieces: list[Piece] = []
        for chunk in sorted(filled, key=lambda c: c.offsets):
            key = (name, chunk.offsets)
            item = items.get(key)
            if item is None:
                raise _corrupt(f"the chunk of {name!r} at {list(chunk.offsets)} has no storage entry"[:400])
            used.add(key)
            pieces.append(Piece(chunk.offsets, _read_chunk(files.path(item), item, name, dtype, chunk, pickles)))
        tensors.append(_logical(name, dtype, size, pieces, str(metadata_path)))
    unused = len(set(items) - used)
    if unused:
        warnings.append(f"{unused} storage entries belong to no key of state_dict_metadata")
    if not tensors:
        raise CheckpointError("no_tensors", "the checkpoint holds no tensors")
    roots, default_root = _roots([t.name for t in tensors], meta.get("planner_data"))
    version = meta.get("version")
    if isinstance(version, str):
        metadata["dcp.version"] = version[:100]
    names = sorted(files.paths)
    metadata["dcp.files"] = names
    return Checkpoint(
        format="torch-dcp",
        tensors=tensors,
        roots=roots,
        default_root=default_root,
        metadata=metadata,
        warnings=warnings,
        files=[str(metadata_path), *(str(files.paths[n]) for n in names)],
    )


def _dtype(properties: Any, name: str) -> str:
    where = f"the properties of {name[:100]!r}"
    if not isinstance(properties, _Obj) or properties.cls != "TensorProperties":
        raise _corrupt(f"{where} are not TensorProperties")
    state = properties.state
    if isinstance(state, tuple) and len(state) == 5:  # TensorProperties.__getstate__
        dtype, layout = state[0], state[1]
    else:
        fields = _fields(properties, "TensorProperties", where)
        dtype, layout = fields.get("dtype"), fields.get("layout", _Layout("strided"))
    if not isinstance(dtype, _DType):
        raise _corrupt(f"{where} name no torch dtype")
    if dtype.name not in DTYPES:
        raise CheckpointError("unsupported_dtype", f"tensor {name[:100]!r} has unsupported dtype {dtype.name}")
    if isinstance(layout, _Layout) and layout.name != "strided":
        raise CheckpointError(
            "unsupported_format", f"tensor {name[:100]!r} has the {layout.name} layout; only dense tensors are read"
        )
    return dtype.name


def _chunk(raw: Any, name: str, size: tuple[int, ...]) -> _Chunk:
    fields = _fields(raw, "ChunkStorageMetadata", f"a chunk of {name[:100]!r}")
    offsets = _int_tuple(fields.get("offsets"), f"the chunk offsets of {name[:100]!r}")
    sizes = _int_tuple(fields.get("sizes"), f"the chunk sizes of {name[:100]!r}")
    if len(offsets) != len(size) or len(sizes) != len(size):
        raise _chunks_error(f"a chunk of {name!r} has {len(offsets)} dimensions, the tensor {len(size)}")
    if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
        raise _chunks_error(
            f"a chunk of {name!r} at {list(offsets)} of shape {list(sizes)} lies outside the tensor's {list(size)}"
        )
    return _Chunk(offsets, sizes)


def _logical(name: str, dtype: str, size: tuple[int, ...], pieces: list[Piece], fallback_path: str) -> TensorInfo:
    """One chunk covering the tensor is the tensor; several are its pieces; none: an empty tensor."""
    if len(pieces) == 1 and pieces[0].info.shape == size:
        return pieces[0].info
    path = pieces[0].info.storage.path if pieces else fallback_path
    key = f"pieces:{name}" if pieces else f"empty:{name}"
    return TensorInfo(
        name=name,
        dtype=dtype,
        shape=size,
        stride=contiguous_stride(size),
        storage_offset=0,
        storage=StorageRef(path, 0, 0, key),
        kind=tensor_kind(name, dtype),
        pieces=tuple(pieces) if len(pieces) > 1 else (),
    )


def directory_resolver(directory: str | Path) -> FileResolver:
    """Find ``.distcp`` files inside ``directory`` only: plain names, no symlink out of it."""
    if is_ranged(directory):
        return _ranged_resolver(as_path(directory))
    base = Path(directory).resolve()

    def resolve(name: str) -> Path | None:
        try:
            validate_relative_path(name)
            real = (base / name).resolve(strict=True)
        except (CheckpointError, OSError):
            return None
        return real if real.parent == base and real.is_file() else None

    return resolve


def _ranged_resolver(base: Path) -> FileResolver:
    """``directory_resolver`` for a directory of an object store (plain names; no links)."""

    def resolve(name: str) -> Path | None:
        try:
            validate_relative_path(name)
        except CheckpointError:
            return None
        child = base / name
        return child if child.is_file() else None

    return resolve


def read_dcp_directory(directory: str | Path) -> Checkpoint:
    """A DCP checkpoint directory: its ``.metadata`` and the ``.distcp`` files beside it."""
    directory = as_path(directory)
    metadata = directory / ".metadata"
    if not metadata.is_file():
        raise CheckpointError("not_checkpoint", "the directory has no .metadata (not a torch.distributed.checkpoint)")
    return read_dcp(metadata, directory_resolver(directory))


__all__ = ["directory_resolver", "is_dcp_metadata", "read_dcp", "read_dcp_directory", "validate_relative_path"]
