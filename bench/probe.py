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


def stats_ckptscope(path: str, device: str = "", extras: str = "1") -> dict:
    """``device``: "" for the CPU kernel, or a torch device ("cuda") for the device engine.
    ``extras`` "0": the moments and histogram alone (``compute_stats(..., extras=False)``: no
    percentiles, log-magnitude histogram or digest); where the engine has no such argument yet the
    answer is ``{"unavailable": why}`` instead of a time."""
    import inspect

    import torch  # noqa: F401  (imported before the base measurement, like the others)

    from ckptscope.formats import open_checkpoint
    from ckptscope.stats.engine import compute_stats

    if extras == "0" and "extras" not in inspect.signature(compute_stats).parameters:
        return {"unavailable": "compute_stats() has no extras= argument in this checkout"}
    ckpt = open_checkpoint(path)
    if device:
        compute_stats(ckpt.tensors[:1], device=device)  # the CUDA context starts outside the timing
    t = time.perf_counter()
    if extras == "0":
        stats = compute_stats(ckpt.tensors, device=device or None, extras=False)
    else:  # the call a checkout from before extras= understands too
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
    """The machine's limit: one torch ``sum()`` per tensor over the same bytes, no statistics. Each
    file (each shard of a sharded set) is mapped read-only with ``mmap``; each tensor is a
    ``torch.frombuffer`` view of its bytes in its own dtype, summed by torch's CPU reduction with
    torch's default intra-op threads (``threads`` in the answer: one per core)."""
    import mmap

    import torch

    from ckptscope.formats import open_checkpoint

    ckpt = open_checkpoint(path)
    maps: dict[str, mmap.mmap] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the mapping is read-only
        for x in ckpt.tensors:
            name = str(x.storage.path)
            if name not in maps:
                with open(name, "rb") as fh:
                    maps[name] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        t = time.perf_counter()
        acc = 0.0
        for x in ckpt.tensors:
            view = torch.frombuffer(
                maps[str(x.storage.path)], dtype=getattr(torch, x.dtype), count=x.numel, offset=x.data_offset
            )
            acc += float(view.sum())
        seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "bytes": sum(x.nbytes for x in ckpt.tensors),
        "elements": sum(x.numel for x in ckpt.tensors),
        "threads": torch.get_num_threads(),
        "checksum": acc,
    }


def h2d_pinned(path: str) -> dict:
    """Pinned host-to-device copy bandwidth, the limit of the CUDA stats path: as many bytes as the
    file's tensors hold, copied in 256 MiB pieces from one pinned buffer (one warm-up copy first)."""
    import torch

    from ckptscope.formats import open_checkpoint

    total = sum(x.nbytes for x in open_checkpoint(path).tensors)
    piece = min(total, 256 << 20)
    host = torch.empty(piece, dtype=torch.uint8).pin_memory()
    device = torch.empty(piece, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    left = total
    while left > 0:
        n = min(piece, left)
        device[:n].copy_(host[:n], non_blocking=True)
        left -= n
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t, "bytes": total}


def inspect_modules(path: str) -> dict:
    """``ckptscope inspect --json PATH`` run in this process (output discarded): whether it imported
    torch, and the time of the command after the interpreter started."""
    import contextlib

    from ckptscope.cli import main as cli_main

    t = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = cli_main(["inspect", "--json", path])
    return {"seconds": time.perf_counter() - t, "exit": code, "imports_torch": "torch" in sys.modules}


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
    for f in (
        list_ckptscope,
        list_safe_open,
        list_torch_mmap,
        stats_ckptscope,
        stats_naive,
        sum_pass,
        h2d_pinned,
        inspect_modules,
        export_half,
    )
}


def main() -> int:
    task, *args = sys.argv[1:]
    if task.startswith(("stats", "sum", "export", "h2d")):
        import torch  # noqa: F401  (the baseline is "after importing torch")
    _reset_peak()
    base = _status("VmRSS")
    result = TASKS[task](*args)
    result.update(base_mib=base, peak_mib=_status("VmHWM"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
