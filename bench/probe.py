"""One measurement in a fresh process: ``python -m bench.probe TASK PATH [ARG]``.

Prints JSON: seconds (the operation only, imports excluded), base_mib (resident memory after
imports, before the operation), peak_mib (VmHWM after it) and task-specific numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key)) / 1024


def _reset_peak() -> None:
    """Start VmHWM from the current RSS, so the peak is the operation's (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def list_ckptscope(path: str) -> dict:
    from ckptscope.formats import open_checkpoint

    t = time.perf_counter()
    ckpt = open_checkpoint(path)
    return {"seconds": time.perf_counter() - t, "tensors": len(ckpt.tensors)}


def list_safe_open(path: str) -> dict:
    from safetensors import safe_open

    t = time.perf_counter()
    with safe_open(path, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    return {"seconds": time.perf_counter() - t, "tensors": len(shapes)}


def list_torch_mmap(path: str) -> dict:
    import torch

    t = time.perf_counter()
    sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return {"seconds": time.perf_counter() - t, "tensors": len(shapes)}


def stats_ckptscope(path: str, device: str = "") -> dict:
    """``device``: "" for the CPU kernel, or a torch device ("cuda") for the device engine."""
    import torch  # noqa: F401  (imported before the base measurement, like the others)

    from ckptscope.formats import open_checkpoint
    from ckptscope.stats.engine import compute_stats

    ckpt = open_checkpoint(path)
    if device:
        compute_stats(ckpt.tensors[:1], device=device)  # the CUDA context starts outside the timing
    t = time.perf_counter()
    stats = compute_stats(ckpt.tensors, device=device or None)
    seconds = time.perf_counter() - t
    insight_seconds = 0.0
    try:  # the init verdicts and findings over the stats (absent in a baseline from before them)
        from ckptscope.services.insights import analyse
    except ImportError:
        pass
    else:
        if os.environ.get("CKPTSCOPE_BENCH_INSIGHTS") == "1":
            t = time.perf_counter()
            analyse([(info, stats[info.name]) for info in ckpt.tensors])
            insight_seconds = time.perf_counter() - t
    return {
        "seconds": seconds + insight_seconds,
        "insight_seconds": insight_seconds,
        "percentiles": all(getattr(s, "percentiles", None) is not None for s in stats.values() if s.numel),
        "bytes": sum(x.nbytes for x in ckpt.tensors),
        "elements": sum(x.numel for x in ckpt.tensors),
        "checksum": sum(s.l2 or 0 for s in stats.values()),
    }


def _tensors(path: str):  # type: ignore[no-untyped-def]
    import torch

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        yield from torch.load(path, mmap=True, weights_only=True, map_location="cpu").items()


def stats_naive(path: str) -> dict:
    """The obvious loop: load each tensor, one torch op per statistic."""
    import torch

    t = time.perf_counter()
    total = elements = 0
    for _, x in _tensors(path):
        f = x.float()
        _ = (
            f.mean().item(),
            f.std().item(),
            f.min().item(),
            f.max().item(),
            f.norm().item(),
            (f == 0).sum().item(),
            torch.isnan(f).sum().item(),
            torch.isinf(f).sum().item(),
            torch.histc(f, 64),
        )
        total += x.numel() * x.element_size()
        elements += x.numel()
    return {"seconds": time.perf_counter() - t, "bytes": total, "elements": elements}


def sum_pass(path: str) -> dict:
    """The machine's limit: one torch sum() over the same bytes, mapped, no statistics."""
    import mmap

    import torch

    from ckptscope.formats import open_checkpoint

    ckpt = open_checkpoint(path)
    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        t = time.perf_counter()
        acc = 0.0
        for x in ckpt.tensors:
            acc += float(torch.frombuffer(mm, dtype=getattr(torch, x.dtype), count=x.numel, offset=x.data_offset).sum())
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "bytes": sum(x.nbytes for x in ckpt.tensors), "checksum": acc}


def export_half(path: str, out: str) -> dict:
    from ckptscope.formats import open_checkpoint
    from ckptscope.services.operations import plan_export, write_checkpoint

    ckpt = open_checkpoint(path)
    layers = sorted({int(t.name.split(".")[2]) for t in ckpt.tensors if t.name.startswith("model.layers.")})
    keep = [f"model.layers.{i}" for i in layers[: len(layers) // 2]] + ["model.embed_tokens"]
    outputs = plan_export(ckpt.tensors, keep)
    __import__("pathlib").Path(out).unlink(missing_ok=True)  # a fresh file, as dd gets
    t = time.perf_counter()
    write_checkpoint(__import__("pathlib").Path(out), outputs, "safetensors", {})
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "bytes": sum(o.nbytes for o in outputs),
        "first_offset": outputs[0].source.data_offset,
        "ranges": [[o.source.data_offset, o.nbytes] for o in outputs],
    }


TASKS = {
    f.__name__: f
    for f in (list_ckptscope, list_safe_open, list_torch_mmap, stats_ckptscope, stats_naive, sum_pass, export_half)
}


def main() -> int:
    task, *args = sys.argv[1:]
    if task.startswith(("stats", "sum", "export")):
        import torch  # noqa: F401  (the baseline is "after importing torch")
    _reset_peak()
    base = _status("VmRSS")
    result = TASKS[task](*args)
    result.update(base_mib=base, peak_mib=_status("VmHWM"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
