"""The reviewed list of globals that refuse a pickle (one test per entry), torch's weights-only
allowlist as ckptscope knows it, and the pickle report checked against torch itself."""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint
from ckptscope.formats.pickle_globals import (
    DANGEROUS_MODULES,
    DANGEROUS_NAMES,
    WEIGHTS_ONLY_GLOBALS,
    dangerous,
    weights_only_allowed,
)
from tests.hostile_corpus import _wrap_in_zip

ENTRIES = [(module, "anything") for module in DANGEROUS_MODULES] + list(DANGEROUS_NAMES)


def _calling(module: str, name: str) -> bytes:
    """A protocol-2 pickle that calls ``module.name("echo pwned")``."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."


@pytest.mark.parametrize(("module", "name"), ENTRIES, ids=[f"{m}.{n}" for m, n in ENTRIES])
def test_every_listed_global_refuses_the_file_naming_it_and_its_arguments(tmp_path: Path, module: str, name: str):
    assert dangerous(module, name) is not None
    path = tmp_path / "evil.pt"
    path.write_bytes(_wrap_in_zip(_calling(module, name)))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert err.value.code == "unsafe_pickle"
    # protocol-2 pickles name Python 2 modules; they are read as pickle.load reads them
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    assert f"{module}.{name}('echo pwned')" in str(err.value)
    report = err.value.extra["pickle"]
    assert {"name": f"{module}.{name}", "count": 1, "role": "refused"} in report["globals"]
    assert report["weights_only_loadable"] is False
    assert f"{module}.{name}" not in report["safe_globals_needed"]


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("argparse", "Namespace"),
        ("types", "SimpleNamespace"),
        ("datetime", "datetime"),
        ("pathlib", "PosixPath"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("omegaconf.dictconfig", "DictConfig"),
        ("lightning_fabric.utilities.data", "AttributeDict"),
        ("torch.nn.modules.conv", "Conv2d"),
        ("builtins", "object"),
        ("copyreg", "_reconstructor"),
        ("my_research_code.models", "Net"),
    ],
)
def test_ordinary_classes_are_not_refused(module: str, name: str):
    assert dangerous(module, name) is None


def test_the_weights_only_table_is_torchs_own():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(_get_allowed_globals()) == WEIGHTS_ONLY_GLOBALS


class _Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))


def _producers() -> dict[str, object]:
    model = _Plain()
    sd = model.state_dict()
    return {
        "state_dict": sd,
        "keep_vars": model.state_dict(keep_vars=True),
        "ordered": collections.OrderedDict(sd),
        "namespace": {"model": sd, "args": argparse.Namespace(lr=0.1, name="run")},
        "numpy": {"model": sd, "rng": np.random.get_state(), "metric": np.float64(0.5)},
        "datetime_path": {"model": sd, "when": datetime.datetime(2026, 1, 2), "dir": pathlib.Path("/data")},
        "whole_module": model,
        "counter": {"model": sd, "seen": collections.Counter(a=2)},
    }


@pytest.mark.parametrize("case", list(_producers()))
def test_the_report_says_what_torch_load_weights_only_does(tmp_path: Path, case: str):
    obj = _producers()[case]
    path = tmp_path / f"{case}.pt"
    torch.save(obj, path)
    report = open_checkpoint(path).pickle
    assert report is not None
    try:
        torch.load(path, weights_only=True)
        loads = True
    except Exception:
        loads = False
    assert report["weights_only_loadable"] is loads
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    # torch's helper lists the globals the pickle names; a numpy dtype's BUILD also needs the
    # dtype's own class (numpy.dtypes.UInt32DType), which it does not name
    needed = set(report["safe_globals_needed"])
    assert unsafe <= needed and all(n.startswith("numpy.dtypes.") for n in needed - unsafe)
    assert all(weights_only_allowed(g["name"]) == (g["name"] not in unsafe) for g in report["globals"])
    if not loads:  # the named globals are exactly what makes it load
        objects = [_resolve(name) for name in report["safe_globals_needed"]]
        with torch.serialization.safe_globals(objects):
            torch.load(path, weights_only=True)


def _resolve(qualname: str) -> object:
    import importlib

    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # a class of this test module, pickled as __main__/tests...
        return globals()[name]


def test_a_protocol_4_pickle_is_not_weights_only_loadable_whatever_its_globals(tmp_path: Path):
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    report = open_checkpoint(path).pickle
    assert report is not None
    with pytest.raises(Exception):  # noqa: B017  torch's own refusal, whatever its type
        torch.load(path, weights_only=True)
    assert report["weights_only_loadable"] is False
    assert report["safe_globals_needed"] == []
    assert "opcode" in report["note"]
