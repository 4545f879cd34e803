"""Issue 17's figures: checkpoints read where they live, on a loopback S3-protocol server.

    python -m bench.sources [--runs 3] [--dir bench-data/sources] [--out BENCHMARKS.md] [--quick]

- time to tree of a 100-shard safetensors index listed from the bucket (header ranges only), with
  the bytes read beside the bytes the checkpoint holds;
- full-stats throughput of one fp32 safetensors file read from the bucket (ranges streamed once to
  a temp file, then the same engine) and from the local file, alternating, fresh processes;
- the Dask path with 1 and 2 worker processes (``local:N``) on the same object, cluster start
  excluded, and from the per-worker rate an estimate for a 700 GB checkpoint on N workers.

The server is moto's (tests/s3_server.py) in this process's thread: loopback, one Python process
serving every byte, so its throughput is the server's more than the client's; a real store with
several nodes serves ranges in parallel. The section between the markers in BENCHMARKS.md is
rewritten; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.sections import write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- sources:begin -->", "<!-- sources:end -->"


# --- the measurements, each in a fresh process ---------------------------------------------------


def probe_tree(url: str) -> dict:
    from ckptscope.formats.sandbox import Limits
    from ckptscope.services.references import BucketObjects
    from ckptscope.stats.tree import build_tree
    from ckptscope.store.sources import SourceClient

    client = SourceClient()
    t = time.perf_counter()
    from ckptscope.formats.ranged import open_ranged_checkpoint

    listing, report = open_ranged_checkpoint(url, BucketObjects(client, None), limits=Limits(2 << 30, 60, 120))
    build_tree(listing.tensors)
    return {
        "seconds": time.perf_counter() - t,
        "tensors": len(listing.tensors),
        "bytes_read": client.served_bytes(),
        "rounds": report.rounds,
    }


def _remote(url: str) -> tuple[list, object]:
    from ckptscope.formats.sandbox import Limits
    from ckptscope.services.references import open_remote

    listing, reader = open_remote(url, Limits(2 << 30, 60, 120))
    return listing.tensors, reader


def probe_stats_s3(url: str) -> dict:
    from ckptscope.stats.spool import compute_stats_ranged

    tensors, reader = _remote(url)
    t = time.perf_counter()
    stats = compute_stats_ranged(tensors, reader)  # type: ignore[arg-type]
    return {"seconds": time.perf_counter() - t, "tensors": len(stats)}


def probe_stats_local(path: str) -> dict:
    from ckptscope.formats import open_checkpoint
    from ckptscope.stats.engine import compute_stats

    tensors = open_checkpoint(path).tensors
    t = time.perf_counter()
    stats = compute_stats(tensors)
    return {"seconds": time.perf_counter() - t, "tensors": len(stats)}


def probe_stats_dask(url: str, workers: str) -> dict:
    from ckptscope.jobs.dask_stats import close_local_clusters, compute_stats_dask

    tensors, reader = _remote(url)
    scheduler = f"local:{workers}"
    compute_stats_dask(tensors[:1], reader, scheduler)  # starts the cluster (excluded)
    t = time.perf_counter()
    stats = compute_stats_dask(tensors, reader, scheduler)
    seconds = time.perf_counter() - t
    close_local_clusters()
    return {"seconds": seconds, "tensors": len(stats)}


PROBES = {"tree": probe_tree, "stats_s3": probe_stats_s3, "stats_local": probe_stats_local, "dask": probe_stats_dask}


def _fresh(env: dict[str, str], task: str, *args: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bench.sources", "--probe", task, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"probe {task} failed: {out.stderr.strip().splitlines()[-1:]}")
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    whole = time.perf_counter() - started
    print(f"{task} {' '.join(args)}: {result['seconds']:.2f} s ({whole:.1f} s)", file=sys.stderr)
    return result


# --- fixtures -----------------------------------------------------------------------------------


def _make_files(d: Path, quick: bool) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    shards = d / "shards"
    index = shards / "model.safetensors.index.json"
    if not index.exists():
        shards.mkdir(exist_ok=True)
        torch.manual_seed(0)
        weight_map = {}
        n = 100
        for i in range(n):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {f"layers.{i}.w{j}": torch.randn(256, 256) for j in range(8)}  # 2 MiB a shard
            save_file(part, shards / name)
            weight_map |= dict.fromkeys(part, name)
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    big = d / "big.safetensors"
    if not big.exists():
        torch.manual_seed(1)
        rows = 4 if quick else 16  # 64 MiB or 256 MiB: moto serves ~40 MB/s, the file must not take minutes
        save_file({f"w{i}": torch.randn(rows * 1024, 1024) for i in range(4)}, big)
    return index, big


def _median(results: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in results), "runs": [r["seconds"] for r in results]}


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.s3_server import S3Server

    index, big = _make_files(Path(args.dir), args.quick)
    server = S3Server()
    try:
        bucket = "bench"
        server.boto.create_bucket(Bucket=bucket)
        for p in sorted(index.parent.iterdir()):
            server.boto.upload_file(str(p), bucket, f"shards/{p.name}")
        server.boto.upload_file(str(big), bucket, "big.safetensors")
        env = dict(server.env)
        tree_url = f"s3://{bucket}/shards/{index.name}"
        big_url = f"s3://{bucket}/big.safetensors"
        shard_bytes = sum(p.stat().st_size for p in index.parent.iterdir())
        trees = [_fresh(env, "tree", tree_url) for _ in range(args.runs)]
        s3_runs, local_runs, dask1, dask2 = [], [], [], []
        for _ in range(args.runs):  # alternating, each in a fresh process
            s3_runs.append(_fresh(env, "stats_s3", big_url))
            local_runs.append(_fresh(env, "stats_local", str(big)))
        for _ in range(args.runs):
            dask1.append(_fresh(env, "dask", big_url, "1"))
            dask2.append(_fresh(env, "dask", big_url, "2"))
    finally:
        server.stop()
    return {
        "tree": _median(trees) | {"bytes_read": trees[0]["bytes_read"], "rounds": trees[0]["rounds"]},
        "tree_total_bytes": shard_bytes,
        "tree_tensors": trees[0]["tensors"],
        "big_bytes": big.stat().st_size,
        "stats_s3": _median(s3_runs),
        "stats_local": _median(local_runs),
        "dask1": _median(dask1),
        "dask2": _median(dask2),
        "runs": args.runs,
    }


def report(r: dict) -> str:
    gb = r["big_bytes"] / 1e9

    def rate(key: str) -> float:
        return r["big_bytes"] / r[key]["seconds"] / 1e9

    per_worker = rate("dask1")
    lines = [
        BEGIN,
        "## Checkpoints where they live (issue 17; moto's S3 server on loopback)",
        "",
        f"Medians of {r['runs']} fresh processes; the two sides of each comparison alternate. "
        "The server is moto in one Python thread pool on this 2-core machine, so these figures bound the "
        "client by a slow server; `python -m bench.sources` regenerates this section.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| time to tree, 100-shard safetensors index ({r['tree_tensors']} tensors) | "
        f"{r['tree']['seconds'] * 1000:.0f} ms, {r['tree']['rounds']} rounds |",
        f"| bytes read to list it / bytes it holds | {r['tree']['bytes_read'] / 1e6:.2f} MB / "
        f"{r['tree_total_bytes'] / 1e6:.0f} MB ({r['tree']['bytes_read'] / r['tree_total_bytes']:.2%}; "
        f"{r['tree']['bytes_read'] / 100 / 1024:.0f} KiB a shard: the first and last 64 KiB each listing round 1 "
        "reads, whatever the shard's size, so a real 5 GB shard costs the same) |",
        f"| full stats, {gb:.2f} GB fp32 file, from the bucket | {r['stats_s3']['seconds']:.2f} s "
        f"({rate('stats_s3'):.2f} GB/s) |",
        f"| full stats, the same file, local (warm) | {r['stats_local']['seconds']:.2f} s "
        f"({rate('stats_local'):.2f} GB/s) |",
        f"| bucket / local | {r['stats_local']['seconds'] / r['stats_s3']['seconds']:.2f}x |",
        f"| Dask `local:1`, from the bucket | {r['dask1']['seconds']:.2f} s ({per_worker:.2f} GB/s) |",
        f"| Dask `local:2`, from the bucket | {r['dask2']['seconds']:.2f} s ({rate('dask2'):.2f} GB/s; "
        f"{r['dask1']['seconds'] / r['dask2']['seconds']:.2f}x of one worker) |",
        "",
        "**A 700 GB checkpoint on N workers** (an estimate from the measured per-worker rate, "
        f"{per_worker:.2f} GB/s, assuming the store serves every worker at that rate and the work "
        "spreads evenly, which 256 MiB whole-tensor tasks allow for any checkpoint of many tensors): "
        + ", ".join(f"{n} workers ~{700 / (per_worker * n) / 60:.1f} min" for n in (1, 8, 32, 128))
        + f". The same engine's own rate here is {rate('stats_local'):.2f} GB/s a core (the local file), so where the "
        "store is not the bottleneck a worker that gets 0.5 GB/s of network takes 700 GB in "
        + ", ".join(f"{n} workers ~{700 / (min(0.5, rate('stats_local')) * n) / 60:.1f} min" for n in (8, 32, 128))
        + ". A real S3 endpoint gives one connection about 0.1-0.2 GB/s and scales with parallel "
        "ranges; then each worker's rate is its network share, not this loopback figure. Here the bucket "
        "path is bound by moto (one Python process on the same 2 cores serving every range), which is "
        "also why two Dask workers are no faster than one: they share that server and those cores.",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=str(ROOT / "bench-data" / "sources"))
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.probe:
        task, *rest = args.probe
        print(json.dumps(PROBES[task](*rest)))
        return 0
    results = run(args)
    write_section(Path(args.out), report(results), BEGIN, END)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
