"""Copy, freeze, export and diff over lists of TensorInfo: the same code serves files (CLI) and
catalogue entries (API, UI)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptscope.errors import Invalid, UnsupportedOutput
from ckptscope.formats import TensorInfo
from ckptscope.formats.model import DTYPES
from ckptscope.formats.pickled_tree import mark_aliases
from ckptscope.formats.writers import OutputTensor, write_safetensors, write_torch_zip
from ckptscope.stats.tree import module_order

from .selection import normalize_mapping, normalize_prefix, rename, under

# --- prefix matching ------------------------------------------------------------------------
# Requests may name thousands of prefixes, and checkpoints hold up to hundreds of thousands of
# tensors: matching every name against every prefix would be their product (10,000 x 500,000 =
# 5e9 comparisons). A trie of dotted segments finds the prefixes a name lies under in time linear
# in the name, whatever their number, with exactly ``selection.under``'s meaning.


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    prefix: str | None = None  # the (normalized) prefix ending here


class PrefixSet:
    """Normalized module prefixes; ``hits(name)`` are those that ``name`` is under."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.everything = False  # "" selects every name
        self._root = _Node()
        self._depth = 0
        for p in prefixes:
            if p == "":
                self.everything = True
                continue
            node = self._root
            segments = p.split(".")
            for segment in segments:
                node = node.children.setdefault(segment, _Node())
            node.prefix = p
            self._depth = max(self._depth, len(segments))

    def hits(self, name: str) -> list[str]:
        """The prefixes ``name`` lies under (``under(name, p)``), shortest first."""
        found = [""] if self.everything else []
        node = self._root
        if not node.children:
            return found
        for segment in name.split(".", self._depth)[: self._depth]:
            child = node.children.get(segment)
            if child is None:
                break
            node = child
            if node.prefix is not None:
                found.append(node.prefix)
        return found

    def matches(self, name: str) -> bool:
        return self.everything or bool(self.hits(name))

    def longest(self, name: str) -> str | None:
        hits = self.hits(name)
        return hits[-1] if hits else None


class Renamer:
    """``selection.rename`` with a mapping of any size: the longest matching prefix is found in
    the trie, then renamed as ``rename`` does."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self.mapping = dict(mapping)  # normalized (normalize_mapping)
        self._prefixes = PrefixSet(self.mapping)

    def __call__(self, name: str) -> str | None:
        old = self._prefixes.longest(name)
        return None if old is None else rename(name, {old: self.mapping[old]})


def output_format_for(fmt: str) -> str:
    """The file format a copy into a checkpoint of format ``fmt`` is written in."""
    return "safetensors" if "safetensors" in fmt else "pt"


def write_checkpoint(path: Path, outputs: Sequence[OutputTensor], fmt: str, metadata: dict[str, str]) -> None:
    _check_decodable(outputs)
    if fmt == "safetensors":
        write_safetensors(path, dedupe_for_safetensors(outputs, metadata), metadata)
    elif fmt == "pt":
        write_torch_zip(path, outputs, metadata)
    else:
        raise UnsupportedOutput(f"unknown output format {fmt!r}; choose safetensors or pt")


def dedupe_for_safetensors(outputs: Sequence[OutputTensor], metadata: dict[str, str]) -> list[OutputTensor]:
    """safetensors refuses shared tensors: keep the first name of each tied group (as
    ``safetensors.torch.save_model`` does) and record the dropped names in the metadata."""
    kept: dict[tuple[object, ...], str] = {}
    out: list[OutputTensor] = []
    dropped: dict[str, str] = {}
    for t in outputs:
        ident = t.storage_identity
        if ident in kept:
            dropped[t.name] = kept[ident]
            continue
        kept[ident] = t.name
        out.append(t)
    if dropped:
        metadata["ckptscope.tied"] = json.dumps(dropped, sort_keys=True)
    return out


# --- export ---------------------------------------------------------------------------------


# dtypes an export may store floating-point tensors in; encoded tensors (GGUF quantisations) are
# dequantized to it, to float32 when none is given
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def _check_decodable(outputs: Sequence[OutputTensor]) -> None:
    from ckptscope.formats.gguf_decoding import can_decode

    for o in outputs:
        if o.source.encoding == "meta":
            raise UnsupportedOutput(
                f"tensor {o.source.name!r} is a meta-device tensor: the file holds no values to write; "
                "exclude it from the selection"
            )
        if o.source.encoding is not None and not can_decode(o.source.encoding):
            raise UnsupportedOutput(
                f"tensor {o.source.name!r} is stored as {o.source.encoding}, which ckptscope cannot decode; "
                "exclude it from the selection"
            )


def _export_dtype(t: TensorInfo, dtype: str | None) -> str | None:
    """The dtype an export stores ``t`` in (None: its own; encoded tensors decode to their dtype)."""
    if t.quant is not None:  # quantized: dequantized, to float32 unless a dtype is given
        return dtype
    if dtype is None or dtype == t.dtype or DTYPES[t.dtype].category != "float":
        return None
    return dtype


def dequantized(outputs: Sequence[OutputTensor]) -> dict[str, Any] | None:
    """What an export or copy decodes: the float dtype, how many tensors, of which encodings."""
    encoded = [o for o in outputs if o.source.encoding is not None or o.source.quant is not None]
    if not encoded:
        return None
    encodings: dict[str, int] = {}
    for o in encoded:
        name = str(o.source.encoding or o.source.file_dtype)
        encodings[name] = encodings.get(name, 0) + 1
    dtypes = sorted({o.out_dtype for o in encoded})
    return {"dtype": ", ".join(dtypes), "tensors": len(encoded), "encodings": encodings}


def dequantized_text(summary: Mapping[str, Any]) -> str:
    kinds = ", ".join(f"{n} {enc}" for enc, n in sorted(summary["encodings"].items()))
    return f"dequantized {summary['tensors']} quantized tensors ({kinds}) to {summary['dtype']}"


def plan_export(
    tensors: Sequence[TensorInfo],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rename_map: Mapping[str, str] | None = None,
    dtype: str | None = None,
) -> list[OutputTensor]:
    """The tensors an export writes. ``dtype`` (one of EXPORT_DTYPES): store floating-point tensors
    in it; encoded ones (GGUF quantisations) are dequantized to it, or to float32 without one."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise Invalid(f"export dtype {dtype[:40]!r} is not one of {', '.join(EXPORT_DTYPES)}")
    inc = PrefixSet([normalize_prefix(p) for p in include] or [""])
    exc = PrefixSet([normalize_prefix(p) for p in exclude])
    mapping = normalize_mapping(rename_map or {})
    renamer = Renamer(mapping)
    outputs: list[OutputTensor] = []
    names: dict[str, str] = {}
    for t in tensors:
        if not inc.matches(t.name) or exc.matches(t.name):
            continue
        new = renamer(t.name) if mapping else None
        new = t.name if new is None else new
        if not new:
            raise Invalid(f"renaming {t.name!r} leaves an empty name")
        if new in names:
            raise Invalid(f"renaming makes {names[new]!r} and {t.name!r} both {new!r}")
        names[new] = t.name
        outputs.append(OutputTensor(new, t, _export_dtype(t, dtype)))
    if not outputs:
        raise Invalid("the selection matches no tensor")
    return outputs


def source_metadata(metadata: Mapping[str, Any], fmt: str) -> dict[str, str]:
    """What a new file keeps of its source's metadata: a safetensors source's own ``__metadata__``
    (e.g. transformers' ``"format": "pt"``) when the new file is safetensors too, without the
    ``ckptscope.*`` keys of an earlier export or copy (the new file gets its own)."""
    if fmt != "safetensors":
        return {}
    prefix = "__metadata__."
    return {
        key: v
        for k, v in metadata.items()
        if k.startswith(prefix) and isinstance(v, str) and not (key := k[len(prefix) :]).startswith("ckptscope.")
    }


def export_metadata(
    source_name: str,
    source_sha256: str,
    selection: Mapping[str, Any],
    plan: FreezePlan | None,
    source_meta: Mapping[str, Any],
    fmt: str,
    decoded: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """What an exported file records about where it came from (safetensors ``__metadata__``, or
    ``ckptscope.json`` in a torch zip), and what it dequantized (``decoded``, see ``dequantized``)."""
    metadata = source_metadata(source_meta, fmt) | {
        "ckptscope.source_sha256": source_sha256,
        "ckptscope.source_name": source_name,
        "ckptscope.selection": json.dumps(selection, sort_keys=True),
    }
    if plan is not None:
        metadata["ckptscope.freeze_plan"] = json.dumps(plan.to_json(with_snippet=False), sort_keys=True)
    if decoded:
        metadata["ckptscope.dequantized"] = json.dumps(decoded, sort_keys=True)
    return metadata


def copy_metadata(target_meta: Mapping[str, Any], fmt: str, provenance: Mapping[str, Any]) -> dict[str, str]:
    """What a copy's result records: the target's kept metadata and where the copied values came
    from (``provenance``: the source, the target, the mapping, strictness)."""
    return source_metadata(target_meta, fmt) | {"ckptscope.copy": json.dumps(provenance, sort_keys=True)}


def export_with_plan(
    tensors: Sequence[TensorInfo],
    include: Sequence[str],
    exclude: Sequence[str],
    rename_map: Mapping[str, str] | None,
    freeze: Sequence[str],
    dtype: str | None = None,
) -> tuple[list[OutputTensor], FreezePlan | None]:
    """The tensors an export writes and the freeze plan embedded in it. ``freeze`` names modules
    of the source (as its tree shows them); with ``rename_map`` the plan names them as the
    exported file does (``renamed_freeze``), or the export is refused (never a wrong plan)."""
    outputs = plan_export(tensors, include, exclude, rename_map, dtype)
    plan = None
    if freeze:
        written = mark_aliases([o.source.renamed(o.name, None) for o in outputs])  # tied: as written
        plan = freeze_plan(written, renamed_freeze(freeze, outputs, normalize_mapping(rename_map or {})))
    return outputs, plan


def renamed_freeze(freeze: Sequence[str], outputs: Sequence[OutputTensor], mapping: Mapping[str, str]) -> list[str]:
    """Freeze prefixes of the source in the names an export writes: a prefix inside a renamed
    module takes its new name (``layers.0`` -> ``blocks.0`` for ``layers.=blocks.``), and one
    holding renamed modules also gets their new names (``model`` -> ``model``, ``blocks`` for
    ``model.layers.=blocks.``). Checked over the written tensors: every prefix freezes exactly
    what it covers in the source; where no set of new prefixes does (a renaming that moves part
    of a module's tensors under another's name), ``Invalid``."""
    prefixes = [normalize_prefix(p) for p in freeze]
    if not mapping:
        return prefixes
    renamer = Renamer(mapping)
    origins: dict[str, set[str]] = {}  # new prefix -> the source prefixes it stands for
    for p in prefixes:
        new = renamer(p)
        for q in [p if new is None else new, *(n for old, n in mapping.items() if old != p and under(old, p))]:
            origins.setdefault(q, set()).add(p)
    source, written = PrefixSet(prefixes), PrefixSet(origins)
    for o in outputs:
        before = set(source.hits(o.source.name))
        after = {p for q in written.hits(o.name) for p in origins[q]}
        if before != after:
            wrong = sorted(before ^ after)[0]
            how = (
                f"is under {wrong!r} but is written as {o.name!r}, outside the names the plan gives it"
                if wrong in before
                else f"is not under {wrong!r} but is written as {o.name!r}, under the name the plan gives it"
            )
            raise Invalid(
                f"the freeze plan cannot name {wrong!r} in the renamed export: {o.source.name!r} {how} "
                "(freeze prefixes name modules of the source, before renaming; freeze the modules inside it instead)"
            )
    return list(origins)


# --- freeze ---------------------------------------------------------------------------------


@dataclass(slots=True)
class FreezePlan:
    freeze: list[str]
    frozen: list[str]
    trainable: list[str]
    buffers: list[str]
    tied: dict[str, str]
    unmatched_prefixes: list[str]
    frozen_params: int
    trainable_params: int
    trainable_fraction: float
    # parameter/buffer labels the file does not give (guessed from names and dtypes): a plan
    # built on a guess says so, so that the user can check those names against the model
    guessed_kinds: list[str] = field(default_factory=list)

    def to_json(self, with_snippet: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if with_snippet:
            out["snippet"] = self.snippet()
        return out

    def snippet(self) -> str:
        prefixes = ", ".join(repr(p) for p in self.freeze)
        return f'''import torch

# Freeze plan generated by ckptscope: {len(self.frozen)} parameter tensors frozen
# ({self.frozen_params:,} values), {len(self.trainable)} trainable ({self.trainable_params:,} values).
FROZEN_MODULES = ({prefixes}{"," if len(self.freeze) == 1 else ""})
FROZEN_PARAMS = {self.frozen_params}
TRAINABLE_PARAMS = {self.trainable_params}


def is_frozen(name: str) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in FROZEN_MODULES)


def apply_freeze_plan(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Set requires_grad=False on the planned parameters; return the trainable ones."""
    for name, param in model.named_parameters():
        if is_frozen(name):
            param.requires_grad_(False)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if frozen != FROZEN_PARAMS:
        raise RuntimeError(f"froze {{frozen}} values, the plan expects {{FROZEN_PARAMS}}: do the names match?")
    return [p for p in model.parameters() if p.requires_grad]


# trainable = apply_freeze_plan(model)
# optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # optimizer over trainable parameters only
'''


def freeze_plan(tensors: Sequence[TensorInfo], freeze: Sequence[str]) -> FreezePlan:
    if not freeze:
        raise Invalid("name at least one module to freeze")
    prefixes = [normalize_prefix(p) for p in freeze]
    prefix_set = PrefixSet(prefixes)
    frozen, trainable, buffers = [], [], []
    tied: dict[str, str] = {}
    frozen_n = trainable_n = 0
    matched = set()
    guessed: list[str] = []
    for t in tensors:
        hits = prefix_set.hits(t.name)
        matched.update(hits)
        if t.kind_source != "file":
            guessed.append(t.name)
        if t.kind == "buffer":
            buffers.append(t.name)
            continue
        if t.alias_of:  # one parameter seen under two names: counted once, like named_parameters()
            tied[t.name] = t.alias_of
            continue
        if hits:
            frozen.append(t.name)
            frozen_n += t.numel
        else:
            trainable.append(t.name)
            trainable_n += t.numel
    total = frozen_n + trainable_n
    return FreezePlan(
        freeze=prefixes,
        frozen=frozen,
        trainable=trainable,
        buffers=buffers,
        tied=tied,
        unmatched_prefixes=[p for p in prefixes if p not in matched],
        frozen_params=frozen_n,
        trainable_params=trainable_n,
        trainable_fraction=trainable_n / total if total else 0.0,
        guessed_kinds=guessed,
    )


# --- copy -----------------------------------------------------------------------------------


@dataclass(slots=True)
class CopyReport:
    mapping: dict[str, str]
    strict: bool
    copied: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[dict[str, str]] = field(default_factory=list)
    shape_mismatches: list[dict[str, Any]] = field(default_factory=list)
    dtype_changes: list[dict[str, str]] = field(default_factory=list)
    # target names outside the selection whose values change because they share a storage (one
    # Parameter) with a copied name: {"name", "via" (the copied target name), "source"}
    aliases_updated: list[dict[str, str]] = field(default_factory=list)
    # tied target storages that two selected source tensors fill with different values: the later
    # target name (in the target's state_dict order) wins, as in load_state_dict
    tied_conflicts: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[OutputTensor] = field(default_factory=list)
    # the written copy read back (services.identity.verify_copy): identical/mismatched target names
    # and, per mapping entry, whether the target module now equals the source's; None: not written
    verified: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """What load_state_dict(strict=True) would accept."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def to_json(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "strict": self.strict,
            "ok": self.ok,
            "copied": self.copied,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatches": self.shape_mismatches,
            "dtype_changes": self.dtype_changes,
            "aliases_updated": self.aliases_updated,
            "tied_conflicts": self.tied_conflicts,
            "verified": self.verified,
            "counts": {
                "copied": len(self.copied),
                "missing": len(self.missing),
                "unexpected": len(self.unexpected),
                "shape_mismatches": len(self.shape_mismatches),
                "dtype_changes": len(self.dtype_changes),
                "aliases_updated": len(self.aliases_updated),
                "tied_conflicts": len(self.tied_conflicts),
            },
        }


def copy_report(
    source: Sequence[TensorInfo], target: Sequence[TensorInfo], mapping: Mapping[str, str], strict: bool = True
) -> CopyReport:
    """What ``target_module.load_state_dict(source_module.state_dict(), strict=...)`` would do, and
    the tensors of the result: the target's, with copied values (cast to the target's dtype, as
    ``load_state_dict`` casts into the existing parameter).

    Target names that view one storage (tied weights: ``lm_head.weight`` and the embedding) are
    one Parameter: copying into any of them updates all of them, and they stay one storage in the
    written file. When two selected source tensors fill one such storage with different values,
    the later target name in the target's order wins (as ``load_state_dict`` copies into each
    name in ``state_dict`` order); a strict copy refuses that (``tied_conflict``)."""
    if not mapping:
        raise Invalid("mapping is empty: give at least one 'source prefix': 'target prefix'")
    mapping = normalize_mapping(mapping)
    renamer = Renamer(mapping)
    report = CopyReport(mapping, strict)
    by_name = {t.name: t for t in target}
    chosen: dict[str, TensorInfo] = {}
    mapped_from: dict[str, str] = {}
    for s in source:
        new = renamer(s.name)
        if new is None:
            continue
        if new in mapped_from:
            raise Invalid(f"{mapped_from[new]!r} and {s.name!r} both map to {new!r}")
        mapped_from[new] = s.name
        t = by_name.get(new)
        if t is None:
            report.unexpected.append({"source": s.name, "target": new})
            continue
        if s.shape != t.shape:
            report.shape_mismatches.append(
                {"source": s.name, "target": new, "source_shape": list(s.shape), "target_shape": list(t.shape)}
            )
            continue
        if DTYPES[s.dtype].category == "complex" and DTYPES[t.dtype].category != "complex":
            report.shape_mismatches.append(
                {
                    "source": s.name,
                    "target": new,
                    "source_shape": list(s.shape),
                    "target_shape": list(t.shape),
                    "reason": "complex values cannot be copied into a real tensor",
                }
            )
            continue
        chosen[new] = s
        change = None
        if s.dtype != t.dtype:
            change = {"from": s.dtype, "to": t.dtype}
            report.dtype_changes.append({"target": new, **change})
        report.copied.append({"source": s.name, "target": new, "shape": list(s.shape), "dtype_change": change})
    targets = PrefixSet(set(mapping.values()))
    touched = set(chosen) | {m["target"] for m in report.shape_mismatches}
    report.missing = [t.name for t in target if targets.matches(t.name) and t.name not in touched]
    groups = tie_groups(target)
    if chosen:
        _check_overlapping_views(target, groups, chosen)
    written = _resolve_ties(report, groups, chosen)
    for t in target:
        group = groups[t.name]
        winner = written.get(group)
        if winner is None:
            report.outputs.append(OutputTensor(t.name, t, tie=group))
        else:
            value = chosen[winner]
            report.outputs.append(OutputTensor(t.name, value, t.dtype if value.dtype != t.dtype else None, group))
    return report


def tie_groups(tensors: Sequence[TensorInfo]) -> dict[str, str]:
    """name -> the first name (in order) viewing exactly the same data: the names of one tied
    Parameter map to one group. Only plain tensors tie (decoded and stitched ones stand alone)."""
    first: dict[tuple[object, ...], str] = {}
    return {t.name: first.setdefault(t.view_key, t.name) if t.plain else t.name for t in tensors}


def _resolve_ties(report: CopyReport, groups: Mapping[str, str], chosen: Mapping[str, TensorInfo]) -> dict[str, str]:
    """group -> the copied target name whose source values the whole tied group gets; fills the
    report's ``aliases_updated`` and ``tied_conflicts`` (raising on a conflict when strict)."""
    members: dict[str, list[str]] = {}
    for name, group in groups.items():  # target order
        members.setdefault(group, []).append(name)
    written: dict[str, str] = {}
    for group, names in members.items():
        copied = [n for n in names if n in chosen]
        if not copied:
            continue
        winner = written[group] = copied[-1]  # load_state_dict copies into each name in turn
        value = chosen[winner]
        if len(names) == 1:
            continue
        losers = [n for n in copied[:-1] if not _same_values(chosen[n], value)]
        if losers:
            conflict = {
                "storage": names,
                "sources": [{"source": chosen[n].name, "target": n} for n in copied],
                "winner": {"source": value.name, "target": winner},
            }
            if report.strict:
                first = losers[0]
                raise Invalid(
                    f"strict copy refused: {chosen[first].name!r} -> {first!r} and {value.name!r} -> {winner!r} "
                    f"write different values into one tied storage; copy only one of them, or copy "
                    f"non-strict to let {winner!r} win as load_state_dict does",
                    code="tied_conflict",
                )
            report.tied_conflicts.append(conflict)
        report.aliases_updated.extend(
            {"name": n, "via": winner, "source": value.name} for n in names if n not in chosen
        )
    return written


def _same_values(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two source tensors hold the same values (the same data, or equal elements)."""
    if a.view_key == b.view_key:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not (a.plain and b.plain):
        return False
    from ckptscope.stats.compare import compare

    return bool(compare(a, b)["identical"])


def _check_overlapping_views(
    target: Sequence[TensorInfo], groups: Mapping[str, str], chosen: Mapping[str, TensorInfo]
) -> None:
    """Refuse a copy into a tensor whose storage another target tensor views differently (a
    transpose, an overlapping slice): load_state_dict would change that view too, and the written
    file cannot reproduce it. Disjoint views of one storage (a flat parameter buffer) are fine."""
    written = {groups[n] for n in chosen}
    by_storage: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    for t in target:
        if not t.plain or t.numel == 0:
            continue
        last = t.storage_offset + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride, strict=True))
        extent = (t.storage_offset * t.itemsize, (last + 1) * t.itemsize)
        by_storage.setdefault((t.storage.path, t.storage.key), {}).setdefault(groups[t.name], extent)
    for views in by_storage.values():
        if len(views) < 2 or not written.intersection(views):
            continue
        # byte extents sorted by start: each one overlaps an earlier one iff it starts before the
        # furthest end so far; track that end over all earlier extents and over written ones
        furthest: tuple[int, str] | None = None
        furthest_written: tuple[int, str] | None = None
        for start, end, group in sorted((a, b, g) for g, (a, b) in views.items()):
            other = None
            if group in written and furthest is not None and start < furthest[0]:
                other = furthest[1]
            elif furthest_written is not None and start < furthest_written[0]:
                other, group = group, furthest_written[1]
            if other is not None:
                raise Invalid(
                    f"cannot copy into {group!r}: target tensor {other!r} views part of the same storage "
                    "differently, and the written file cannot keep that tie",
                    code="tied_view",
                )
            if furthest is None or end > furthest[0]:
                furthest = (end, group)
            if group in written and (furthest_written is None or end > furthest_written[0]):
                furthest_written = (end, group)


# --- diff -----------------------------------------------------------------------------------


def diff_tensors(
    a: Sequence[TensorInfo],
    b: Sequence[TensorInfo],
    digests_a: Mapping[str, str | None] | None = None,
    digests_b: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """``digests_a``/``digests_b``: the tensors' content digests where known (the catalogue's stats):
    tensors whose digests are equal are identical without reading them (``skipped_reads`` counts
    them). ``identical_modules``: the outermost modules whose tensors are all identical (same
    names, same values); ``moved_modules``: modules of A that B holds, identical, under another path
    (by module digest, ``insights.identity``)."""
    from ckptscope.stats.compare import compare, identical_by_digest

    da, db = digests_a or {}, digests_b or {}
    skipped = 0
    b_by_name = {t.name: t for t in b}
    a_names = {t.name for t in a}
    rows: list[dict[str, Any]] = []
    for t in a:
        other = b_by_name.get(t.name)
        if other is None:
            rows.append({"name": t.name, "status": "only_a", "shape_a": list(t.shape), "dtype_a": t.shown_dtype})
            continue
        row: dict[str, Any] = {
            "name": t.name,
            "shape_a": list(t.shape),
            "shape_b": list(other.shape),
            "dtype_a": t.shown_dtype,  # the file's own type name (a GGUF quantisation such as Q4_K)
            "dtype_b": other.shown_dtype,
        }
        if t.shape != other.shape:
            row["status"] = "shape_changed"
        else:
            metrics = identical_by_digest(t, other, da.get(t.name), db.get(other.name))
            if metrics is None:
                metrics = compare(t, other)
            else:
                skipped += 1
            row.update(metrics)
            row["status"] = (
                "identical"
                if metrics["identical"]
                else "dtype_changed"
                if t.shown_dtype != other.shown_dtype
                else "changed"
            )
        rows.append(row)
    rows.extend(
        {"name": t.name, "status": "only_b", "shape_b": list(t.shape), "dtype_b": t.shown_dtype}
        for t in b
        if t.name not in a_names
    )
    tree = diff_tree(rows)
    return {
        "tensors": rows,
        "tree": tree,
        "counts": _status_counts(rows),
        "skipped_reads": skipped,
        "identical_modules": identical_modules(tree),
        "moved_modules": _moved_modules(a, b, da, db),
    }


def identical_modules(tree: Mapping[str, Any]) -> list[str]:
    """The outermost modules of a diff tree whose every tensor is identical in A and B (and none
    only in one of them): ``[""]`` when the whole checkpoints are."""
    found: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if not node["changed"] and sum(node["counts"].values()):
            found.append(node["path"])
        else:
            stack.extend(node["children"])
    return sorted(found)


def _moved_modules(
    a: Sequence[TensorInfo], b: Sequence[TensorInfo], da: Mapping[str, str | None], db: Mapping[str, str | None]
) -> list[dict[str, str]]:
    if not (da and db):
        return []
    from ckptscope.insights.identity import module_digests, moved_modules

    ma = module_digests((t.name, da.get(t.name)) for t in a)
    mb = module_digests((t.name, db.get(t.name)) for t in b)
    return [m.to_json() for m in moved_modules(ma, mb)]


STATUSES = ("identical", "changed", "dtype_changed", "shape_changed", "only_a", "only_b")


def _status_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        counts[r["status"]] += 1
    return counts


def diff_tree(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Roll the per-tensor statuses up the module tree: counts per status, the largest absolute
    difference and the lowest cosine similarity below each module."""

    def node(name: str, path: str) -> dict[str, Any]:
        return {
            "name": name,
            "path": path,
            "counts": dict.fromkeys(STATUSES, 0),
            "max_abs_diff": None,
            "min_cosine": None,
            "children": {},
        }

    root = node("", "")
    for r in rows:
        parts = r["name"].split(".")
        chain = [root]
        cur = root
        for i, part in enumerate(parts[:-1]):
            cur = cur["children"].setdefault(part, node(part, ".".join(parts[: i + 1])))
            chain.append(cur)
        for n in chain:
            n["counts"][r["status"]] += 1
            d, c = r.get("max_abs_diff"), r.get("cosine")
            if d is not None and (n["max_abs_diff"] is None or d > n["max_abs_diff"]):
                n["max_abs_diff"] = d
            if c is not None and (n["min_cosine"] is None or c < n["min_cosine"]):
                n["min_cosine"] = c

    def finish(n: dict[str, Any]) -> dict[str, Any]:
        children = n["children"]
        n["children"] = [finish(children[part]) for part in module_order(list(children))]
        n["changed"] = sum(v for k, v in n["counts"].items() if k != "identical") > 0
        return n

    return finish(root)
