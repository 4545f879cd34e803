"""Which torch device computes the stats (the ``CKPTSCOPE_STATS_DEVICE`` setting), asked of torch
only when a device is named: the default, the host CPU's C kernel, never imports torch."""

from __future__ import annotations


def resolve_device(requested: str | None) -> str | None:
    """The torch device for stats from the CKPTSCOPE_STATS_DEVICE setting: None (the host CPU
    engine) for "" or "host", a CUDA device for "auto" when one is present, else the name as given."""
    if not requested or requested == "host":
        return None
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"stats device {requested!r} asked for, but torch sees no CUDA device")
    torch.empty(0, device=requested)  # refuses an unknown device name now, not at the first job
    return requested


def describe(device: str) -> str:
    """A line for logs: which device computes the stats."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return device
