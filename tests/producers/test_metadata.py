"""What a training checkpoint keeps beside its weights, shown as readable values in every face:
an argparse.Namespace (timm, fairseq), datetime, pathlib, NumPy's RNG state, Lightning's
hyper-parameters, loops and callbacks. Nothing of it is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.producers.faces import cli_inspect, rest_view, sandbox_listing


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf, however a face nests the metadata."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}.{index}")
    else:
        yield path, value


def under(metadata: dict, key: str) -> list[tuple[str, Any]]:
    return [(p, v) for p, v in leaves(metadata) if p == key or p.startswith(key + ".")]


def texts(metadata: dict, key: str) -> list[str]:
    """The text shown under ``key``: its leaves' values and the path parts below it (a class
    name may be a key, as in {"args": {"argparse.Namespace": {...}}})."""
    out = []
    for path, value in under(metadata, key):
        out.append(str(value))
        out.extend(path.split(".")[1:])
    return out


def faces_metadata(case, api, memo) -> dict[str, dict]:
    return {
        "library": sandbox_listing(case, memo).metadata,
        "cli": cli_inspect(case, memo)["metadata"],
        "rest": rest_view(case, api, memo).detail["metadata"],
    }


@pytest.mark.parametrize("case", ["training-ckpt"], indirect=True)
def test_a_training_checkpoints_objects_are_readable_values(case, api, memo):
    for face, meta in faces_metadata(case, api, memo).items():
        assert ("epoch", 3) in list(leaves(meta)), (face, meta.get("epoch"))
        args = under(meta, "args")
        assert any("Namespace" in text for text in texts(meta, "args")), (face, args)
        assert any(p.endswith("lr") and v == 0.1 for p, v in args), (face, args)
        assert any(p.endswith("name") and v == "x" for p, v in args), (face, args)
        when = under(meta, "when")
        assert any("2026-01-01" in str(v) for _, v in when), (face, when)
        path = under(meta, "path")
        assert any("/tmp/x" in str(v) for _, v in path), (face, path)
        rng = under(meta, "rng")
        assert any(v == "MT19937" for _, v in rng), (face, rng[:5])
        assert any(v == 624 for _, v in rng), (face, rng[:5])  # the generator's position


@pytest.mark.parametrize("case", ["training-ckpt"], indirect=True)
def test_a_training_checkpoints_roots(case, memo):
    ckpt = sandbox_listing(case, memo)
    assert {r.path for r in ckpt.roots} >= {"", "model", "optimizer", "optimizer.state"}
    assert ckpt.default_root == "model"


@pytest.mark.parametrize("case", ["lightning-ckpt"], indirect=True)
def test_lightning_hyper_parameters_loops_and_callbacks(case, api, memo):
    """Against the checkpoint as torch.load gives it."""
    loaded = case.loaded
    assert loaded["hyper_parameters"]["lr"] == 0.1 and loaded["callbacks"]  # the fixture has them
    for face, meta in faces_metadata(case, api, memo).items():
        flat = list(leaves(meta))
        for key, value in loaded["hyper_parameters"].items():
            path = f"hyper_parameters.{key}"
            want = dict(leaves(list(value) if isinstance(value, tuple) else value, path))
            assert dict(under(meta, path)) == want, (face, key)
        for key in ("epoch", "global_step", "pytorch-lightning_version", "hparams_name"):
            assert (key, loaded[key]) in flat, (face, key, meta.get(key))
        (callback,) = loaded["callbacks"]  # its key is the callback's repr
        assert "ModelCheckpoint" in callback
        assert any(callback in text for text in texts(meta, "callbacks")), (face, under(meta, "callbacks")[:3])
        loops = under(meta, "loops.fit_loop")
        assert loops, face
        progress = loaded["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"]
        assert ("loops.fit_loop.epoch_progress.total.completed", progress) in flat, (face, loops[:5])
    ckpt = sandbox_listing(case, memo)
    assert {r.path for r in ckpt.roots} >= {"state_dict", "optimizer_states"}
