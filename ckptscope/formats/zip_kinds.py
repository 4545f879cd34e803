"""Zip archives that are not PyTorch checkpoints, told apart by their entry names so the refusal
can say what the file is: a NumPy ``.npz``, a ``torch.export`` ``.pt2`` or a Keras 3 ``.keras``."""

from __future__ import annotations

from collections.abc import Sequence

from ckptscope.errors import CheckpointError

_READS = "ckptscope reads safetensors, PyTorch (torch.save) and GGUF files"


def _is_npz(names: Sequence[str]) -> bool:
    # numpy.savez / savez_compressed: one "<key>.npy" entry per array, nothing else
    return bool(names) and all(n.endswith(".npy") and not n.endswith("/") for n in names)


def _is_pt2(names: Sequence[str]) -> bool:
    # torch.export.save: <archive>/archive_format ("pt2"), <archive>/models/*.json, <archive>/data/...
    if not any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return False
    return any("models/" in n or "data/" in n for n in names)


def _is_keras(names: Sequence[str]) -> bool:
    # Keras 3 model.save("x.keras"): config.json, metadata.json and the weights (HDF5, or npz)
    present = set(names)
    has_weights = bool(present & {"model.weights.h5", "model.weights.npz"})
    return {"config.json", "metadata.json"} <= present and has_weights


def zip_refusal(names: Sequence[str]) -> CheckpointError | None:
    """The refusal naming what a non-PyTorch zip is, or None when it is none of the known kinds."""
    if _is_npz(names):
        return CheckpointError(
            "numpy_npz",
            f"this is a NumPy .npz archive ({len(names)} array{'s' if len(names) != 1 else ''}, numpy.savez); "
            f"it is not read: {_READS}",
        )
    if _is_pt2(names):
        return CheckpointError(
            "torch_export",
            "this is a torch.export archive (.pt2, torch.export.save): a traced program with its weights; "
            "it is not read. Save model.state_dict() with torch.save or safetensors instead",
        )
    if _is_keras(names):
        return CheckpointError(
            "keras",
            f"this is a Keras 3 model (.keras: config.json, metadata.json, model.weights.h5); it is not read: {_READS}",
        )
    return None
