"""Sharded sets: a ``*.index.json`` whose ``weight_map`` names the shard holding each tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ckptscope.errors import CheckpointError

from .model import Checkpoint, RootInfo, TensorInfo
from .pickled_tree import mark_aliases, plain_value
from .ranged_path import as_path, is_ranged, open_all_on_miss, will_open

MAX_INDEX_BYTES = 64 * 1024 * 1024
ShardResolver = Callable[[str], Path | None]


def _bad(message: str) -> CheckpointError:
    return CheckpointError("bad_index", message)


def load_index(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError("limit_exceeded", "index file is larger than 64 MiB")
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"index is not valid JSON: {exc}"[:300]) from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError("not_checkpoint", "JSON file without a weight_map: not a sharded checkpoint index")
    return index


def shard_family(name: str) -> str:
    return "safetensors" if name.endswith(".safetensors") else "torch"


def validate_shard_name(shard: Any) -> str:
    if not isinstance(shard, str) or not shard or len(shard) > 255:
        raise _bad("weight_map holds an empty, overlong or non-string shard name")
    if "\\" in shard or "\x00" in shard or "/" in shard:
        raise _bad(f"shard name {shard[:100]!r} must be a plain file name (no directories)")
    if shard in (".", "..") or PurePosixPath(shard).is_absolute():
        raise _bad(f"shard name {shard[:100]!r} is not allowed")
    return shard


def expected_family(index_name: str | None, shards: list[str]) -> str:
    if index_name and index_name.endswith(".safetensors.index.json"):
        return "safetensors"
    if index_name and index_name.endswith((".bin.index.json", ".pt.index.json", ".pth.index.json")):
        return "torch"
    families = {shard_family(s) for s in shards}
    if len(families) != 1:
        raise _bad("index mixes safetensors and torch shards")
    return families.pop()


def read_sharded(
    index_path: str | Path,
    open_single: Callable[[Path], Checkpoint],
    resolve: ShardResolver | None = None,
    index_name: str | None = None,
) -> Checkpoint:
    index_path = as_path(index_path)
    index = load_index(index_path)
    weight_map: dict[str, Any] = index["weight_map"]
    shards = sorted({validate_shard_name(s) for s in weight_map.values()})
    if not shards:
        raise CheckpointError("no_tensors", "the index's weight_map is empty")
    family = expected_family(index_name or index_path.name, shards)
    for shard in shards:
        if shard_family(shard) != family:
            raise _bad(f"shard {shard!r} does not match the index's {family} format")
    resolve = resolve or (lambda name: index_path.parent / name)
    tensors: list[TensorInfo] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    files = [str(index_path)]
    if is_ranged(index_path):  # in a store: every shard's size, header and misses in one round
        shard_paths = [resolve(shard) for shard in shards]
        will_open(shard_paths)
        open_single = open_all_on_miss(open_single, shard_paths)
    for shard in shards:
        shard_path = resolve(shard)
        if shard_path is None or not shard_path.is_file():
            raise CheckpointError("missing_shard", f"shard {shard!r} named by the index was not provided")
        part = open_single(shard_path)
        actual = "safetensors" if part.format == "safetensors" else "torch"
        if actual != family:
            raise _bad(f"shard {shard!r} is a {part.format} file, but the index expects {family} shards")
        files.append(str(shard_path))
        for t in part.root_tensors(part.default_root):
            mapped = weight_map.get(t.name)
            if t.name in seen:
                warnings.append(f"tensor {t.name!r} appears in both {seen[t.name]!r} and {shard!r}")
                continue
            if mapped is None:
                warnings.append(f"tensor {t.name!r} in shard {shard!r} is not listed in the index")
            elif mapped != shard:
                warnings.append(f"tensor {t.name!r} is in shard {shard!r} but the index says {mapped!r}")
            seen[t.name] = shard
            tensors.append(t)
    missing = [name for name in weight_map if name not in seen]
    for name in missing[:50]:
        warnings.append(f"tensor {name!r} is listed in the index but missing from shard {weight_map[name]!r}")
    if len(missing) > 50:
        warnings.append(f"... and {len(missing) - 50} more tensors missing from their shards")
    raw_meta = index.get("metadata")
    metadata = {f"index.{k}": plain_value(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    metadata["shards"] = shards
    return Checkpoint(
        format=f"sharded-{family}",
        tensors=mark_aliases(tensors),
        roots=[RootInfo("", len(tensors))],
        metadata=metadata,
        warnings=warnings,
        files=files,
    )
