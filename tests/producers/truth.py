"""What each producer's file holds, as the producer's own loader says (torch.load(weights_only=True),
safetensors.safe_open, model.state_dict()), and the comparisons every face is held to."""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ckptscope.stats import HIST_BINS

STAT_FLOATS = ("mean", "std", "min", "max", "l2", "absmax")
STAT_COUNTS = ("numel", "zeros", "nan", "inf")
PICKLE_ROLES = {"tensor", "data", "object", "call", "refused"}


@dataclass(frozen=True)
class Expect:
    """One tensor as the producer's loader gives it (``name`` dotted from the file's top level)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    alias_of: str | None
    kind: str | None  # from the model; None where the tensor is no model's (optimizer state)
    kind_source: str  # "file" where the file says parameter/buffer, else "name"
    values: torch.Tensor | None  # what the stats are over; None: no data (meta device)


@dataclass
class Case:
    id: str
    path: Path  # what `inspect` and the library open (a sharded set: its index)
    uploads: list[Path]  # what REST receives (a sharded set: the index, then the shards)
    format: str
    expected: dict[str, Expect]
    default_root: str = ""
    module_types: dict[str, str] = field(default_factory=dict)  # full module path -> class
    weights_only_loadable: bool | None = None  # pickled files: does torch.load(weights_only=True) load it
    allowlistable: bool | None = None  # does it load once the globals it needs are allowlisted
    unsafe_globals: frozenset[str] = frozenset()  # torch's own list of globals it refuses in the file
    loaded: Any = None  # the object torch.load gave, where a test compares more than tensors

    @property
    def pickled(self) -> bool:
        return self.format in ("torch-zip", "torch-legacy")

    def under(self, root: str) -> Case:
        """The case as a listing of ``root`` shows it: names (and aliases, module paths) relative."""
        if root == "":
            return self

        def rel(name: str | None) -> str | None:
            return name[len(root) + 1 :] if name is not None and name.startswith(root + ".") else None

        expected = {
            r: dataclasses.replace(e, name=r, alias_of=rel(e.alias_of))
            for e in self.expected.values()
            if (r := rel(e.name)) is not None
        }
        types = {("" if p == root else rel(p)): c for p, c in self.module_types.items() if p == root or rel(p)}
        return dataclasses.replace(self, expected=expected, module_types=types)


# --- the truth ---------------------------------------------------------------------------------


def model_kinds(model: nn.Module, prefix: str = "", rename: Any = None) -> dict[str, str]:
    """Full name -> "parameter" | "buffer", from the model itself (tied names included)."""
    kinds: dict[str, str] = {}
    for kind, named in (
        ("parameter", model.named_parameters(remove_duplicate=False)),
        ("buffer", model.named_buffers(remove_duplicate=False)),
    ):
        for name, _ in named:
            name = rename(name) if rename else name
            kinds[f"{prefix}.{name}" if prefix else name] = kind
    return kinds


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _values(t: torch.Tensor) -> torch.Tensor | None:
    if t.is_meta:
        return None
    if t.is_quantized:  # ckptscope's stats are over the dequantized values, computed in float64
        q = t.int_repr().double()
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return (q - t.q_zero_point()) * t.q_scale()
        shape = [1] * t.dim()
        shape[t.q_per_channel_axis()] = -1
        scales = t.q_per_channel_scales().double().reshape(shape)
        zero_points = t.q_per_channel_zero_points().double().reshape(shape)
        return (q - zero_points) * scales
    return t.detach()


def flatten(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """Every tensor of a loaded object with its key path (dict keys and list indices), as ckptscope
    names it once dotted."""
    if isinstance(obj, torch.Tensor):
        yield prefix or ("tensor",), obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from flatten(value, (*prefix, str(key)))
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            yield from flatten(value, (*prefix, str(index)))


def expectations(
    named: Iterable[tuple[str, torch.Tensor]], kinds: Mapping[str, str], *, from_file: Any = None
) -> dict[str, Expect]:
    """``from_file(name, tensor)``: whether the file itself says the tensor's kind."""
    out: dict[str, Expect] = {}
    owners: dict[tuple[Any, ...], str] = {}
    for name, t in named:
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        owner = owners.setdefault(key, name)
        says = bool(from_file and from_file(name, t))
        kind = kinds.get(name)
        out[name] = Expect(
            name=name,
            dtype=dtype_name(t),
            shape=tuple(t.shape),
            alias_of=None if owner == name else owner,
            kind=kind,
            kind_source="file" if says else "name",
            values=_values(t),
        )
    return out


def optimized(expected: dict[str, Expect], model: nn.Module, prefix: str, optimizer: str) -> dict[str, Expect]:
    """A training checkpoint whose optimizer (its state dict at key path ``optimizer``) holds every
    trainable parameter: the optimizer's per-parameter state tells those tensors are parameters
    (the file says so), and its own tensors are state, listed as buffers the file says are ones."""
    out = dict(expected)
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = f"{prefix}.{name}"
            out[key] = dataclasses.replace(out[key], kind_source="file")
    for key, e in expected.items():
        if key.startswith(optimizer + "."):
            out[key] = dataclasses.replace(e, kind="buffer", kind_source="file")
    return out


def weights_only_loads(path: Path, safe: Iterable[Any] = ()) -> bool:
    """Whether torch.load(weights_only=True) loads the file (with ``safe`` allowlisted)."""
    try:
        load_torch(path, safe)
    except Exception:
        return False
    return True


def load_torch(path: Path, safe: Iterable[Any] = ()) -> Any:
    with torch.serialization.safe_globals(list(safe)):
        return torch.load(path, weights_only=True)


def _container(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:  # the path holds dict keys as text (optimizer state keys are ints)
        obj = next(v for k, v in obj.items() if str(k) == part) if isinstance(obj, Mapping) else obj[int(part)]
    return obj


def object_truth(obj: Any, kinds: Mapping[str, str]) -> dict[str, Expect]:
    """A loaded torch object's tensors. The file says a tensor's kind where it pickled an
    nn.Parameter, and for the plain tensors beside one in the same dict (a
    ``state_dict(keep_vars=True)``: parameters as nn.Parameter, buffers plain); a state_dict of
    plain tensors says nothing."""
    leaves = list(flatten(obj))
    in_dict = {path for path, _ in leaves if isinstance(_container(obj, path[:-1]), Mapping)}
    with_parameters = {path[:-1] for path, t in leaves if isinstance(t, nn.Parameter) and path in in_dict}
    says = {
        ".".join(path)
        for path, t in leaves
        if isinstance(t, nn.Parameter) or (path in in_dict and path[:-1] in with_parameters and not t.is_quantized)
    }
    named = [(".".join(path), t) for path, t in leaves]
    return expectations(named, kinds, from_file=lambda name, _t: name in says)


def torch_file_truth(path: Path, kinds: Mapping[str, str], safe: Iterable[Any] = ()) -> dict[str, Expect]:
    """A torch file as torch.load(weights_only=True) gives it (``safe`` allowlisted where needed)."""
    return object_truth(load_torch(path, safe), kinds)


def module_truth(model: nn.Module) -> dict[str, Expect]:
    """A pickled whole module: names as model.state_dict() gives them; each module's
    _parameters/_buffers say what every tensor is."""
    return expectations(model.state_dict().items(), model_kinds(model), from_file=lambda _name, _t: True)


def safetensors_truth(path: Path, kinds: Mapping[str, str]) -> dict[str, Expect]:
    with safe_open(str(path), "pt") as f:
        named = [(k, f.get_tensor(k)) for k in f.keys()]
    return expectations(named, kinds)


def sharded_truth(index: Path, kinds: Mapping[str, str]) -> tuple[dict[str, Expect], list[Path]]:
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, Expect] = {}
    paths = [index.parent / s for s in shards]
    for p in paths:
        out |= safetensors_truth(p, kinds) if p.name.endswith(".safetensors") else torch_file_truth(p, kinds)
    return out, paths


def resolve_global(dotted: str) -> Any:
    """The real object a pickle global names (module.qualname), imported here in the test."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"{dotted!r} names nothing importable")


# --- the comparisons ---------------------------------------------------------------------------


def listing_problems(records: Iterable[Mapping[str, Any]], case: Case) -> list[str]:
    """Where a face's listing (records with name, dtype, shape, alias_of, kind, kind_source) differs
    from the producer's."""
    got = {r["name"]: r for r in records}
    problems = []
    missing = [n for n in case.expected if n not in got]
    extra = [n for n in got if n not in case.expected]
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensors not in the file, e.g. {extra[:3]}")
    for name, e in case.expected.items():
        r = got.get(name)
        if r is None:
            continue
        want = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "alias_of": e.alias_of,
            "kind_source": e.kind_source,
        }
        if e.kind is not None:
            want["kind"] = e.kind
        for key, value in want.items():
            if key not in r:
                problems.append(f"{name}: no {key!r} field")
            elif list(r[key]) != value if key == "shape" else r[key] != value:
                problems.append(f"{name}: {key} {r[key]!r}, the producer says {value!r}")
    return problems


def assert_listing(records: Iterable[Mapping[str, Any]], case: Case) -> None:
    problems = listing_problems(records, case)
    assert not problems, f"{case.id}: {len(problems)} differences: " + "; ".join(problems[:8])


def reference(values: torch.Tensor) -> dict[str, Any]:
    """The stats computed plainly over the float64 values (as tests/stats does)."""
    x = values.reshape(-1).to(torch.float64)
    finite = x[torch.isfinite(x)]
    out: dict[str, Any] = {
        "numel": values.numel(),
        "zeros": int((x == 0).sum()),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "finite": finite.numel(),
    }
    if finite.numel():
        out |= {
            "mean": finite.mean().item(),
            "std": finite.std().item() if finite.numel() > 1 else None,
            "min": finite.min().item(),
            "max": finite.max().item(),
            "l2": finite.norm().item(),
            "absmax": finite.abs().max().item(),
        }
    return out


def stats_problems(stats_by_name: Mapping[str, Mapping[str, Any] | None], case: Case) -> list[str]:
    problems = []
    for name, e in case.expected.items():
        if name not in stats_by_name:
            continue  # the listing comparison reports it
        got = stats_by_name[name]
        if e.values is None:  # no data in the file (meta device): no value may be made up
            if got and any(got.get(k) is not None for k in STAT_FLOATS):
                made_up = {k: got.get(k) for k in STAT_FLOATS}
                problems.append(f"{name}: stats {made_up} for a tensor without data")
            if got and not got.get("note"):
                problems.append(f"{name}: stats without data carry no note saying why")
            continue
        if got is None:
            problems.append(f"{name}: no stats")
            continue
        ref = reference(e.values)
        for key in STAT_COUNTS:
            if got.get(key) != ref[key]:
                problems.append(f"{name}: {key} {got.get(key)!r}, torch says {ref[key]!r}")
        for key in STAT_FLOATS:
            want = ref.get(key)
            value = got.get(key)
            if want is None:
                if value is not None:
                    problems.append(f"{name}: {key} {value!r}, torch says undefined")
            elif value is None or value != pytest.approx(want, rel=1e-7, abs=1e-12):
                problems.append(f"{name}: {key} {value!r}, torch says {want!r}")
        hist = got.get("hist")
        if not isinstance(hist, list) or len(hist) != HIST_BINS or sum(hist) != ref["finite"]:
            problems.append(f"{name}: histogram does not count the {ref['finite']} finite values")
        json.dumps(got, allow_nan=False)
    return problems


def assert_stats(stats_by_name: Mapping[str, Mapping[str, Any] | None], case: Case) -> None:
    problems = stats_problems(stats_by_name, case)
    assert not problems, f"{case.id}: {len(problems)} differences: " + "; ".join(problems[:8])


def tree_nodes(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield node
    for child in node.get("children") or []:
        yield from tree_nodes(child)


def assert_tree_module_types(tree: Mapping[str, Any], case: Case) -> None:
    """Every node carries ``module_type``: the class pickled there (whole-module pickles), else null."""
    problems = []
    for node in tree_nodes(tree):
        if "module_type" not in node:
            problems.append(f"node {node.get('path')!r} has no module_type field")
        elif node["module_type"] != case.module_types.get(node["path"]):
            problems.append(
                f"node {node['path']!r}: module_type {node['module_type']!r}, "
                f"the file holds {case.module_types.get(node['path'])!r}"
            )
    assert not problems, f"{case.id}: " + "; ".join(problems[:8])


def pickle_report_problems(report: Any, case: Case) -> list[str]:
    """The pickle report of a pickled file, against torch 2.13 itself."""
    if not case.pickled:
        return [] if report is None else [f"a {case.format} file has a pickle report"]
    if not isinstance(report, dict):
        return [f"no pickle report (got {report!r})"]
    problems = []
    if not {"globals", "weights_only_loadable", "safe_globals_needed"} <= set(report):
        problems.append(f"report fields {sorted(report)}")
    globals_ = report.get("globals") or []
    names = set()
    for g in globals_:
        if set(g) != {"name", "count", "role"}:
            problems.append(f"global record fields {sorted(g)}")
            continue
        names.add(g["name"])
        if not (isinstance(g["count"], int) and g["count"] >= 1):
            problems.append(f"global {g['name']}: count {g['count']!r}")
        if g["role"] not in PICKLE_ROLES:
            problems.append(f"global {g['name']}: role {g['role']!r}")
        if g["role"] == "refused":
            problems.append(f"global {g['name']} refused in a file the producer wrote")
        if g["name"].startswith("torch._utils._rebuild_tensor") and g["role"] != "tensor":
            problems.append(f"global {g['name']}: role {g['role']!r}, not 'tensor'")
    if not any(n.startswith("torch._utils._rebuild_") for n in names):
        problems.append(f"no torch rebuild function among the globals {sorted(names)[:6]}")
    if not case.unsafe_globals <= names:
        problems.append(f"globals torch refuses are not listed: {sorted(case.unsafe_globals - names)}")
    if report.get("weights_only_loadable") is not case.weights_only_loadable:
        problems.append(
            f"weights_only_loadable {report.get('weights_only_loadable')!r}, "
            f"torch.load(weights_only=True) {'loads' if case.weights_only_loadable else 'refuses'} it"
        )
    needed = report.get("safe_globals_needed")
    if not isinstance(needed, list):
        return [*problems, f"safe_globals_needed {needed!r}"]
    if case.weights_only_loadable and needed:
        problems.append(f"safe_globals_needed {needed} for a file torch loads as it is")
    if not case.unsafe_globals <= set(needed):
        problems.append(f"safe_globals_needed misses {sorted(case.unsafe_globals - set(needed))}")
    if case.allowlistable is False:
        # no list of globals makes torch load it (a legacy whole-module pickle records each
        # module's source through persistent_load, which the weights-only unpickler refuses)
        if not (isinstance(report.get("note"), str) and report["note"]):
            problems.append("no note says why no safe_globals list can make torch load the file")
        return problems
    try:
        objects = [resolve_global(n) for n in needed]
    except (AssertionError, AttributeError) as exc:
        return [*problems, f"safe_globals_needed names something unimportable: {exc}"]
    try:
        with torch.serialization.safe_globals(objects):
            torch.load(case.path, weights_only=True)
    except Exception as exc:
        reason = [line for line in str(exc).splitlines() if "GLOBAL" in line or "got <" in line]
        problems.append(f"torch.load(weights_only=True) with safe_globals({needed}) still fails: {reason[:1]}")
    return problems


def assert_pickle_report(report: Any, case: Case) -> None:
    problems = pickle_report_problems(report, case)
    assert not problems, f"{case.id}: " + "; ".join(problems[:8])
