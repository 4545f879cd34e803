"""Folders read as one checkpoint.

- a Hugging Face model folder (``save_pretrained`` of transformers, diffusers or peft): its sharded
  set (the ``*.index.json``) or its one weights file; safetensors before ``.bin``;
- a torch.distributed.checkpoint directory (``.metadata`` beside ``*.distcp`` files);
- a transformers Trainer ``checkpoint-N/`` folder: the model's weights beside ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth`` and ``training_args.bin``, each file one root of a single
  checkpoint (root ``model`` for the weights, the default), ``trainer_state.json`` summarised
  as metadata.

Which file plays which part is decided from the names, by the conventions of the tools that write
them (``plan_folder``, also used for a folder upload, where the names are all there is); each
file's format is still sniffed from its content by the reader that opens it. A directory is
listed once, only so far (``MAX_ENTRIES``), and links out of it are never followed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ckptscope.errors import CheckpointError

from .dcp import read_dcp
from .model import Checkpoint, OptimizerLayout, RootInfo, TensorInfo
from .optimizer_names import name_optimizer_state
from .pickled_tree import plain_value
from .ranged_path import ranged_folder
from .sharded import ShardResolver

MAX_ENTRIES = 10_000  # entries of one folder looked at
MAX_STATE_BYTES = 16 * 1024 * 1024  # trainer_state.json summarised
MAX_NAMED = 12  # file names a message lists

SAFETENSORS_INDEXES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SAFETENSORS_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "adapter_model.safetensors")
TORCH_INDEXES = ("pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")
TORCH_WEIGHTS = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "adapter_model.bin")
# save_pretrained's .bin family, set aside when the folder also has safetensors weights
_HF_TORCH_NAME = re.compile(r"(pytorch_model|diffusion_pytorch_model|adapter_model)(-\d+-of-\d+)?\.bin(\.index\.json)?")
_SHARD_NAME = re.compile(r".+-\d+-of-\d+\.(safetensors|bin)")
# files that may hold tensors (or be one of the formats refused in their own words)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".tar",
    ".pkl",
    ".gguf",
    ".distcp",
    ".onnx",
    ".pt2",
    ".h5",
    ".hdf5",
    ".keras",
    ".npz",
    ".npy",
    ".pb",
    ".msgpack",
)
# a Trainer's own files beside the model: file name -> root
TRAINER_FILES = {
    "optimizer.pt": "optimizer",
    "optimizer.bin": "optimizer",
    "scheduler.pt": "scheduler",
    "scheduler.bin": "scheduler",
    "scaler.pt": "scaler",
    "rng_state.pth": "rng_state",
    "training_args.bin": "training_args",
}
_RNG_STATE = re.compile(r"rng_state_(\d+)\.pth")
TRAINER_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
MODEL_ROOT = "model"
_STATE_KEYS = (
    "global_step",
    "epoch",
    "max_steps",
    "num_train_epochs",
    "train_batch_size",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "best_metric",
    "best_global_step",
    "best_model_checkpoint",
    "total_flos",
    "num_input_tokens_seen",
    "is_hyper_param_search",
    "trial_name",
)


class Opener(Protocol):
    """``open_checkpoint``: one file (or an index with its shards), errors in our words."""

    def __call__(
        self, path: str | Path, *, resolve_shard: ShardResolver | None = ..., name: str | None = ...
    ) -> Checkpoint: ...


@dataclass(slots=True)
class FolderPlan:
    """What a folder holds, decided from its file names."""

    kind: str  # "weights" (one file or a sharded set), "dcp", "trainer"
    primary: str  # the file the checkpoint is opened from ("" for a Trainer folder without weights)
    reads: list[str]  # the files handed to the readers (the primary, shards, a Trainer's files)
    roots: dict[str, str] = field(default_factory=dict)  # trainer: file name -> root
    ignored: dict[str, str] = field(default_factory=dict)  # file name -> why it is not read (not an error)


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def is_weight_name(name: str) -> bool:
    """A file that may hold tensors (by its name; its content decides what it is)."""
    return name == DCP_METADATA or name.lower().endswith(WEIGHT_SUFFIXES)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") and name != DCP_METADATA


def _first(names: set[str], preferred: Iterable[str]) -> str | None:
    return next((n for n in preferred if n in names), None)


def _choose_weights(names: set[str]) -> tuple[str, dict[str, str]] | None:
    """The model's weights of a save_pretrained folder: (primary file, files set aside)."""
    safe_indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    torch_indexes = sorted(n for n in names if n.endswith((".bin.index.json", ".pt.index.json", ".pth.index.json")))
    candidates = [
        _first(names, SAFETENSORS_INDEXES) or (safe_indexes[0] if len(safe_indexes) == 1 else None),
        _first(names, SAFETENSORS_WEIGHTS),
        _first(names, TORCH_INDEXES) or (torch_indexes[0] if len(torch_indexes) == 1 else None),
        _first(names, TORCH_WEIGHTS),
    ]
    primary = next((c for c in candidates if c is not None), None)
    if primary is None:
        return None
    aside: dict[str, str] = {}
    safetensors = ".safetensors" in primary
    for other in (c for c in candidates if c is not None and c != primary):
        if (".safetensors" in other) == safetensors:
            aside[other] = f"{primary} is read instead"
    for other in (*SAFETENSORS_WEIGHTS, *TORCH_WEIGHTS):
        if other in names and other != primary and other not in aside and (".safetensors" in other) == safetensors:
            aside[other] = f"{primary} is read instead"
    if safetensors:
        for other in names:
            if _HF_TORCH_NAME.fullmatch(other):
                aside[other] = "the safetensors weights are read instead"
    return primary, aside


def _trainer_root(name: str, taken: set[str]) -> str:
    root = TRAINER_FILES.get(name)
    rng = _RNG_STATE.fullmatch(name)
    if root is None and rng is not None:
        root = f"rng_state_{rng.group(1)}"
    if root is None:
        stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
        root = re.sub(r"[^0-9A-Za-z_\-]", "_", stem) or "file"
    unique, n = root, 2
    while unique in taken:
        unique, n = f"{root}_{n}", n + 1
    taken.add(unique)
    return unique


def _is_trainer_folder(names: set[str]) -> bool:
    return TRAINER_STATE in names or any(n in TRAINER_FILES or _RNG_STATE.fullmatch(n) for n in names)


def _no_checkpoint(
    names: Iterable[str], subdirs: Iterable[str], links: Iterable[str], why: str = ""
) -> CheckpointError:
    found = [*sorted(names), *(f"{d}/" for d in sorted(subdirs)), *(f"{n} (a link out of the folder)" for n in links)]
    what = f"found {_listed(found)}" if found else "it is empty"
    return CheckpointError("no_checkpoint", f"no checkpoint in this folder: {what}{why}")


def plan_folder(names: Iterable[str], subdirs: Iterable[str] = (), links: Iterable[str] = ()) -> FolderPlan:
    """Decide what checkpoint a folder's files make (their names only), or refuse naming them."""
    subdirs, links = list(subdirs), list(links)
    listed = {n for n in names if not _is_hidden(n)}
    weights = {n for n in listed if is_weight_name(n) or n.endswith(".index.json") or n == TRAINER_STATE}
    ignored = dict.fromkeys(sorted(listed - weights), "not a checkpoint file")
    if DCP_METADATA in weights:
        reads = [DCP_METADATA, *sorted(n for n in weights if n != DCP_METADATA)]
        return FolderPlan("dcp", DCP_METADATA, reads, ignored=ignored)
    if "saved_model.pb" in weights:  # a TensorFlow SavedModel: its content says so
        aside = {n: "part of the SavedModel" for n in weights if n != "saved_model.pb"}
        return FolderPlan("weights", "saved_model.pb", ["saved_model.pb"], ignored=ignored | aside)
    chosen = _choose_weights(weights)
    if _is_trainer_folder(weights):
        model_files: set[str] = set()
        if chosen is not None:
            primary, aside = chosen
            ignored |= aside
            model_files = {primary}
            if primary.endswith(".index.json"):  # the shards of the model's sharded set
                family = ".safetensors" if ".safetensors." in primary else ".bin"
                model_files |= {n for n in weights if _SHARD_NAME.fullmatch(n) and n.endswith(family)}
        primary = chosen[0] if chosen is not None else ""
        taken = {MODEL_ROOT}
        rest = sorted(weights - model_files - set(ignored) - {TRAINER_STATE})
        ignored |= {n: "the index of another set" for n in rest if n.endswith(".index.json")}
        roots = {n: _trainer_root(n, taken) for n in rest if not n.endswith(".index.json")}
        reads = sorted(model_files) + list(roots) + ([TRAINER_STATE] if TRAINER_STATE in weights else [])
        if primary:
            roots = {primary: MODEL_ROOT} | roots
        return FolderPlan("trainer", primary, reads, roots, ignored)
    if chosen is not None:
        primary, aside = chosen
        ignored |= aside
        return FolderPlan("weights", primary, [primary, *sorted(weights - set(ignored) - {primary})], ignored=ignored)
    candidates = sorted(n for n in weights if is_weight_name(n))
    if candidates and all(n.endswith(".distcp") for n in candidates):  # fragments, never a checkpoint
        why = " (torch.distributed.checkpoint data without its .metadata file)"
        raise _no_checkpoint(listed, subdirs, links, why)
    if len(candidates) == 1:
        return FolderPlan("weights", candidates[0], candidates, ignored=ignored)
    if candidates:
        why = " (several weight files and no index naming them: open one of them)"
        raise _no_checkpoint(listed, subdirs, links, why)
    raise _no_checkpoint(listed, subdirs, links)


# --- reading -----------------------------------------------------------------------------------


def list_folder(directory: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    """A folder's files (name -> path; a link counts only where it stays inside the folder), its
    sub-folders and the links not followed. Refuses a folder of more than MAX_ENTRIES entries."""
    root = directory.resolve(strict=True)
    files: dict[str, Path] = {}
    subdirs: list[str] = []
    links: list[str] = []
    with os.scandir(root) as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_ENTRIES:
                raise CheckpointError("limit_exceeded", f"the folder has more than {MAX_ENTRIES} entries")
            if entry.is_symlink():
                try:
                    target = Path(entry.path).resolve()
                except (OSError, RuntimeError):  # a loop of links
                    links.append(entry.name)
                    continue
                if target.is_relative_to(root) and target.is_file():
                    files[entry.name] = target
                else:
                    links.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                files[entry.name] = Path(entry.path)
    return files, subdirs, links


def read_directory(directory: str | Path, open_file: Opener) -> Checkpoint:
    listed = ranged_folder(directory)  # a directory (prefix) of an object store: its files only
    if listed is not None and len(listed) > MAX_ENTRIES:
        raise CheckpointError("limit_exceeded", f"the folder has more than {MAX_ENTRIES} entries")
    files, subdirs, links = (listed, [], []) if listed is not None else list_folder(Path(directory))
    ckpt = read_folder(files, open_file, subdirs=subdirs, links=links)
    if links:
        ckpt.warnings.append(f"links out of the folder, not followed: {_listed(links)}")
    return ckpt


def read_folder(
    files: Mapping[str, Path],
    open_file: Opener,
    *,
    subdirs: Iterable[str] = (),
    links: Iterable[str] = (),
) -> Checkpoint:
    """Read a folder given as its files (a directory's, or an upload's: name -> path). Only the
    files of the plan are handed to the readers; a sharded index's names resolve among them."""
    plan = plan_folder(files, subdirs, links)
    reads = {name: files[name] for name in plan.reads}
    if plan.kind == "dcp":
        ckpt = _dcp(reads)
    elif plan.kind == "trainer":
        ckpt = _trainer(plan, reads, open_file)
    else:
        ckpt = _open_part(open_file, plan.primary, reads)
    notes = [f"folder: read {plan.primary or 'its files'} ({_KIND_NAMES[plan.kind]})"]
    used = set(ckpt.files)
    unread = [n for n in plan.reads if str(reads[n]) not in used]
    if unread:
        notes.append(f"not read (not part of the checkpoint): {_listed(unread)}")
    by_reason: dict[str, list[str]] = {}
    for name, reason in plan.ignored.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        notes.append(f"ignored ({reason}): {_listed(names)}")
    ckpt.warnings[:0] = notes
    ckpt.metadata.setdefault("folder.kind", plan.kind)
    return ckpt


_KIND_NAMES = {
    "weights": "model weights",
    "dcp": "torch.distributed.checkpoint",
    "trainer": "transformers Trainer checkpoint",
}


def _confined(reads: Mapping[str, Path]) -> Callable[[str], Path | None]:
    """A resolver that names only the folder's own files (a plain name, never a path)."""

    def resolve(name: str) -> Path | None:
        return reads.get(name) if isinstance(name, str) else None

    return resolve


def _open_part(open_file: Opener, name: str, reads: Mapping[str, Path]) -> Checkpoint:
    try:
        return open_file(reads[name], resolve_shard=_confined(reads), name=name)
    except CheckpointError as exc:
        error = CheckpointError(exc.code, f"{name}: {exc.message}")
        error.extra.update(exc.extra)
        raise error from None


def _dcp(reads: Mapping[str, Path]) -> Checkpoint:
    # the .distcp files resolve among the folder's own files only; errors: mapped by open_checkpoint
    return read_dcp(reads[DCP_METADATA], _confined(reads))


def _prefixed(tensors: list[TensorInfo], root: str) -> list[TensorInfo]:
    return [
        t._replace(name=f"{root}.{t.name}", alias_of=f"{root}.{t.alias_of}" if t.alias_of else None) for t in tensors
    ]


def _trainer(plan: FolderPlan, reads: Mapping[str, Path], open_file: Opener) -> Checkpoint:
    tensors: list[TensorInfo] = []
    roots: list[RootInfo] = []
    metadata: dict[str, Any] = {}
    warnings: list[str] = []
    files: list[str] = []
    module_types: dict[str, str] = {}
    pickle: dict[str, Any] | None = None
    param_of: dict[str, str] = {}
    optimizers: list[OptimizerLayout] = []
    default_root = ""
    model_format = ""
    for name, root in plan.roots.items():
        try:
            part = open_file(reads[name], resolve_shard=_confined(reads), name=name)
        except CheckpointError as exc:  # one file's refusal is not the folder's
            why = "holds no tensors" if exc.code == "no_tensors" else f"not read: {exc.message}"
            warnings.append(f"{name}: {why}")
            files.append(str(reads[name]))  # part of the checkpoint all the same (an upload keeps it)
            values = exc.extra.get("metadata")  # a scheduler's or the training arguments' values
            if isinstance(values, dict) and list(values) == ["value"]:  # one pickled object, not a dict
                metadata[root] = values["value"]
            elif isinstance(values, dict):
                metadata |= {f"{root}.{k}": v for k, v in values.items()}
            continue
        tensors += _prefixed(part.tensors, root)
        roots.append(RootInfo(root, len(part.tensors)))
        roots += [RootInfo(f"{root}.{r.path}", r.tensor_count) for r in part.roots if r.path]
        metadata |= {f"{root}.{k}": v for k, v in part.metadata.items()}
        warnings += [f"{name}: {w}" for w in part.warnings]
        files += [f for f in part.files if f not in files]
        module_types |= {(f"{root}.{k}" if k else root): v for k, v in part.module_types.items()}
        param_of |= {f"{root}.{k}": f"{root}.{v}" for k, v in part.param_of.items()}
        optimizers += [o._replace(path=f"{root}.{o.path}" if o.path else root) for o in part.optimizers]
        if part.pickle is not None and (pickle is None or not part.pickle.get("weights_only_loadable", True)):
            pickle = part.pickle  # one report for the folder: the first, or the first torch.load refuses
        if root == MODEL_ROOT:
            default_root = f"{root}.{part.default_root}" if part.default_root else root
            model_format = part.format
    if TRAINER_STATE in reads:
        metadata |= _trainer_state(reads[TRAINER_STATE], warnings)
        files.append(str(reads[TRAINER_STATE]))
    if not tensors:
        first = warnings[0] if warnings else "no file holds tensors"
        raise CheckpointError("no_tensors", f"no file of this Trainer checkpoint could be listed ({first})")
    if optimizers and not param_of:  # optimizer.pt beside the model's file: its state matched against it
        ordered = model_format in ("torch-zip", "torch-legacy")  # a pickled state_dict keeps the model's order
        tensors, param_of = name_optimizer_state(tensors, optimizers, default_root, ordered=ordered)
    return Checkpoint(
        format=f"trainer-{model_format}" if model_format else "trainer",
        tensors=tensors,
        roots=roots,
        default_root=default_root,
        metadata=metadata,
        warnings=warnings,
        files=files,
        module_types=module_types,
        pickle=pickle,
        param_of=param_of,
        optimizers=optimizers,
    )


def _trainer_state(path: Path, warnings: list[str]) -> dict[str, Any]:
    """The figures of trainer_state.json a user looks for (its log history shortened to its last
    entry): bounded, plain values."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            warnings.append(f"{TRAINER_STATE}: larger than {MAX_STATE_BYTES >> 20} MiB, not summarised")
            return {}
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        warnings.append(f"{TRAINER_STATE}: not valid JSON, not summarised")
        return {}
    if not isinstance(state, dict):
        warnings.append(f"{TRAINER_STATE}: not a JSON object, not summarised")
        return {}
    out = {f"trainer_state.{k}": plain_value(state[k]) for k in _STATE_KEYS if k in state}
    history = state.get("log_history")
    if isinstance(history, list):
        out["trainer_state.log_history.entries"] = len(history)
        last = history[-1] if history else None
        if isinstance(last, dict):
            for key, value in list(last.items())[:32]:
                out[f"trainer_state.log_history.last.{str(key)[:100]}"] = plain_value(value)
    return out
