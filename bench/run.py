"""``make bench``: generate checkpoints, measure everything in fresh processes, write BENCHMARKS.md.

    python -m bench.run [--runs 3] [--dir bench-data] [--quick] [--out BENCHMARKS.md]

Every number is the median of ``--runs`` fresh processes after one warm-up run (page cache
warm), with the peak resident memory of the operation above the process's baseline (after
imports; after ``import torch`` where torch is used). Ratios compare numbers from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.files import llm_shapes, small_shapes, write_safetensors, write_torch_copy

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


BASELINE_REF = "743f50c"  # the last commit before issue 15 (percentiles, digests, init verdicts)


def probe(task: str, *args: str, tree: Path = ROOT, insights: bool = False) -> dict:
    """One measurement in a fresh process, with the code of ``tree`` (this checkout, or a baseline's);
    ``insights``: the stats probe also times the init verdicts and findings."""
    env = os.environ | {"PYTHONPATH": str(tree), "CKPTSCOPE_BENCH_INSIGHTS": "1" if insights else "0"}
    out = subprocess.run(
        [PY, "-m", "bench.probe", task, *args],
        capture_output=True,
        text=True,
        cwd=tree,
        check=True,
        timeout=1800,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str, workdir: Path) -> Path | None:
    """The source of ``ref`` (git archive) with its C kernel built in place, to measure "today's"
    engine beside this one in the same run; None where git or a compiler is missing."""
    tree = workdir / f"baseline-{ref}"
    if (tree / ".built").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        subprocess.run([PY, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline {ref}: {exc}", flush=True)
        shutil.rmtree(tree, ignore_errors=True)
        return None
    (tree / ".built").touch()
    return tree


def kernel_pass_costs(baseline: Path) -> dict | None:
    """Nanoseconds per element of each kernel pass, this kernel beside the baseline's, in one fresh
    process (bench/kernel_passes.py); None where either kernel is not built."""
    ours = sorted((ROOT / "ckptscope" / "stats").glob("_kernel*.so"))
    theirs = sorted((baseline / "ckptscope" / "stats").glob("_kernel*.so"))
    if not ours or not theirs:
        return None
    out = subprocess.run(
        [PY, "-m", "bench.kernel_passes", str(ours[0]), str(theirs[0])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def measure_against(runs: int, baseline: Path, task: str, *args: str) -> tuple[dict, dict]:
    """This checkout and the baseline, alternating in fresh processes (after a warm-up of each)."""
    probe(task, *args, insights=True)
    probe(task, *args, tree=baseline)
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(probe(task, *args, insights=True))
        theirs.append(probe(task, *args, tree=baseline))
    return summarise(ours), summarise(theirs)


def measure(runs: int, task: str, *args: str, warm: bool = True) -> dict:
    if warm:
        probe(task, *args)
    return summarise([probe(task, *args) for _ in range(runs)])


def summarise(results: list[dict]) -> dict:
    """The first probe's fields, with medians of time and memory over all of them."""
    out = dict(results[0])
    for key in ("seconds", "peak_mib", "base_mib"):
        out[key] = statistics.median(r[key] for r in results)
    out["grown_mib"] = statistics.median(r["peak_mib"] - r["base_mib"] for r in results)
    out["all_seconds"] = [round(r["seconds"], 4) for r in results]
    return out


def timed_command(runs: int, argv: list[str]) -> dict:
    """Wall time and peak RSS of a whole command (imports included), via GNU time."""
    samples = []
    for i in range(runs + 1):
        out = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", *argv], capture_output=True, text=True, cwd=ROOT, timeout=3600
        )
        if out.returncode != 0:
            return {"error": out.stderr[-500:]}
        wall, kib = out.stderr.strip().splitlines()[-1].split()
        if i:  # the first run warms the page cache
            samples.append((float(wall), int(kib) / 1024))
    return {"seconds": statistics.median(s for s, _ in samples), "peak_mib": statistics.median(m for _, m in samples)}


def merged_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += length
        else:
            merged.append([offset, length])
    return merged


def dd_write(src: Path, dst: Path, merged: list[list[int]]) -> float:
    """dd copying the same bytes with fsync, one invocation per contiguous run: the machine's
    limit for export. Seconds, from a fresh (unlinked) output file like the export's."""
    dst.unlink(missing_ok=True)
    t = time.perf_counter()
    for i, (offset, length) in enumerate(merged):
        conv = "notrunc" + (",fsync" if i == len(merged) - 1 else "")
        flags = ["oflag=append"] if i else []
        subprocess.run(
            [
                "dd",
                f"if={src}",
                f"of={dst}",
                "bs=4M",
                "iflag=skip_bytes,count_bytes",
                *flags,
                f"skip={offset}",
                f"count={length}",
                f"conv={conv}",
                "status=none",
            ],
            check=True,
        )
    seconds = time.perf_counter() - t
    dst.unlink(missing_ok=True)
    return seconds


def export_vs_dd(runs: int, src: Path, workdir: Path) -> dict:
    """Export and dd alternate, run by run (after one warm-up pair), so that this VM's drifting
    write speed affects both alike; medians of each."""
    out = workdir / "export-half.safetensors"
    exports, dds = [], []
    for i in range(runs + 1):
        result = probe("export_half", str(src), str(out))
        out.unlink(missing_ok=True)
        dd = dd_write(src, workdir / "dd-half.bin", merged_ranges(result.pop("ranges")))
        if i:
            exports.append(result)
            dds.append(dd)
    summary = summarise(exports)
    summary["dd_seconds"] = statistics.median(dds)
    summary["dd_all_seconds"] = [round(d, 4) for d in dds]
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_timings(path: Path, workdir: Path) -> dict:
    """Through the API: upload, then time to the tree, to all stats, and a second open (cache)."""
    data = workdir / "server-data"
    shutil.rmtree(data, ignore_errors=True)
    port = _free_port()
    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(data)}
    proc = subprocess.Popen(
        [PY, "-m", "ckptscope.cli", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            for _ in range(300):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            with path.open("rb") as fh:
                t0 = time.perf_counter()
                r = client.post("/api/v1/checkpoints", params={"filename": path.name}, content=fh)
            uploaded = time.perf_counter()
            cid = r.json()["id"]
            client.get(f"/api/v1/checkpoints/{cid}/tree").raise_for_status()
            tree = time.perf_counter()
            while client.get(f"/api/v1/checkpoints/{cid}").json()["stats_state"] not in ("done", "failed"):
                time.sleep(0.02)
            stats = time.perf_counter()
            second = []
            for _ in range(5):
                t = time.perf_counter()
                page = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"limit": 5000})
                second.append(time.perf_counter() - t)
                assert all(x["stats"] is not None for x in page.json()["tensors"])
            html = []
            for _ in range(5):
                t = time.perf_counter()
                client.get(f"/checkpoints/{cid}").raise_for_status()
                html.append(time.perf_counter() - t)
        return {
            "upload_s": uploaded - t0,
            "to_tree_s": tree - uploaded,
            "to_stats_s": stats - uploaded,
            "second_open_api_s": statistics.median(second),
            "second_open_page_s": statistics.median(html),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / 1024**2, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernel": platform.release(),
    }


def generate(d: Path, quick: bool) -> dict[str, Path]:
    import torch

    d.mkdir(parents=True, exist_ok=True)
    files = {
        "f32": d / "llm-f32.safetensors",
        "bf16": d / "llm-bf16.safetensors",
        "pt": d / "llm-f32.pt",
        "small": d / "small-20000.safetensors",
    }
    if not quick:
        files["f32x4"] = d / "llm-f32-x4.safetensors"
    makers = {
        "f32": lambda p: write_safetensors(p, llm_shapes()),
        "bf16": lambda p: write_safetensors(p, llm_shapes(), torch.bfloat16),
        "pt": lambda p: write_torch_copy(files["f32"], p),
        "small": lambda p: write_safetensors(p, small_shapes()),
        "f32x4": lambda p: write_safetensors(p, llm_shapes(layers=34 * 4 + 3)),
    }
    for key, path in files.items():
        if not path.exists():
            print(f"generating {path.name}…", flush=True)
            makers[key](path)
    return files


def run(args: argparse.Namespace) -> dict:
    files = generate(Path(args.dir), args.quick)
    n = args.runs
    r: dict = {
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": n,
        "sizes": {k: p.stat().st_size for k, p in files.items()},
    }
    print("listing…", flush=True)
    r["list"] = {
        "ckptscope_f32": measure(n, "list_ckptscope", str(files["f32"])),
        "ckptscope_small": measure(n, "list_ckptscope", str(files["small"])),
        "ckptscope_pt": measure(n, "list_ckptscope", str(files["pt"])),
        "safe_open_f32": measure(n, "list_safe_open", str(files["f32"])),
        "safe_open_small": measure(n, "list_safe_open", str(files["small"])),
        "torch_mmap_pt": measure(n, "list_torch_mmap", str(files["pt"])),
    }
    if "f32x4" in files:
        r["list"]["ckptscope_f32x4"] = measure(n, "list_ckptscope", str(files["f32x4"]))
    print("stats…", flush=True)
    r["stats"] = {
        "ckptscope_f32": measure(n, "stats_ckptscope", str(files["f32"])),
        "ckptscope_bf16": measure(n, "stats_ckptscope", str(files["bf16"])),
        "ckptscope_pt": measure(n, "stats_ckptscope", str(files["pt"])),
        "ckptscope_small": measure(n, "stats_ckptscope", str(files["small"])),
        "sum_pass_f32": measure(n, "sum_pass", str(files["f32"])),
        "naive_f32": measure(max(1, n // 2), "stats_naive", str(files["f32"])),
    }
    baseline = baseline_tree(args.baseline_ref, Path(args.dir))
    if baseline is not None:
        ours, theirs = measure_against(n, baseline, "stats_ckptscope", str(files["f32"]))
        r["stats"]["vs_baseline"] = {"ref": args.baseline_ref, "ours": ours, "baseline": theirs}
        passes = kernel_pass_costs(baseline)
        if passes:
            r["stats"]["kernel_passes"] = passes
    if "f32x4" in files:
        r["stats"]["ckptscope_f32x4"] = measure(max(1, n // 2), "stats_ckptscope", str(files["f32x4"]))
    if r["machine"].get("gpu"):  # the optional CUDA path (CKPTSCOPE_STATS_DEVICE=cuda), reported apart
        r["stats"]["cuda_f32"] = measure(n, "stats_ckptscope", str(files["f32"]), "cuda")
    print("whole tools (ckptscope inspect vs weightlens)…", flush=True)
    lens = shutil.which("lens", path=str(Path(PY).parent))
    r["tools"] = {
        "ckptscope_inspect_f32": timed_command(
            max(1, n // 2), [PY, "-m", "ckptscope.cli", "inspect", "--json", str(files["f32"])]
        ),
        "ckptscope_inspect_small": timed_command(
            max(1, n // 2), [PY, "-m", "ckptscope.cli", "inspect", "--json", str(files["small"])]
        ),
    }
    if lens:
        r["tools"]["weightlens_f32"] = timed_command(1, [lens, "analyze", str(files["f32"])])
        r["tools"]["weightlens_small"] = timed_command(1, [lens, "analyze", str(files["small"])])
    print("export…", flush=True)
    r["export"] = export_vs_dd(n, files["f32"], Path(args.dir))
    print("HTTP…", flush=True)
    r["http"] = http_timings(files["f32"], Path(args.dir))
    return r


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def report(r: dict) -> str:
    L, S, T, E, H = r["list"], r["stats"], r.get("tools", {}), r["export"], r["http"]
    f32 = S["ckptscope_f32"]
    rate = _gbps(f32["bytes"], f32["seconds"])
    naive = _gbps(S["naive_f32"]["bytes"], S["naive_f32"]["seconds"])
    summ = _gbps(S["sum_pass_f32"]["bytes"], S["sum_pass_f32"]["seconds"])
    bf16 = S["ckptscope_bf16"]
    bf16_rate = bf16["elements"] / bf16["seconds"] / 1e9
    f32_rate = f32["elements"] / f32["seconds"] / 1e9
    export_gbps = _gbps(E["bytes"], E["seconds"])
    dd_gbps = _gbps(E["bytes"], E["dd_seconds"])
    x4 = S.get("ckptscope_f32x4")

    def ms(x: float) -> str:
        return f"{x * 1e3:.1f} ms"

    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    targets = [
        (
            "listing, 2 GB / 309 tensors",
            "< 10 ms",
            ms(L["ckptscope_f32"]["seconds"]),
            L["ckptscope_f32"]["seconds"] < 0.010,
        ),
        (
            "listing, 20,000 tensors",
            "< 100 ms",
            ms(L["ckptscope_small"]["seconds"]),
            L["ckptscope_small"]["seconds"] < 0.100,
        ),
        ("full stats fp32, warm", ">= 2 GB/s", f"{rate:.2f} GB/s", rate >= 2.0),
        ("… vs the naive loop", ">= 8x", f"{rate / naive:.1f}x", rate / naive >= 8),
        ("… vs one sum() pass", ">= 0.10x", f"{rate / summ:.2f}x", rate / summ >= 0.10),
        ("bf16 element rate vs fp32", "same (>= 0.9x)", f"{bf16_rate / f32_rate:.2f}x", bf16_rate / f32_rate >= 0.9),
        ("peak RSS over baseline, 2 GB stats", "<= 250 MB", f"{f32['grown_mib']:.0f} MiB", f32["grown_mib"] <= 250),
    ]
    if x4:
        targets.append(
            ("peak RSS over baseline, 8 GB stats", "<= 250 MB", f"{x4['grown_mib']:.0f} MiB", x4["grown_mib"] <= 250)
        )
    vs = S.get("vs_baseline")
    if vs:
        ratio = vs["ours"]["seconds"] / vs["baseline"]["seconds"]
        grown = vs["ours"]["grown_mib"] - vs["baseline"]["grown_mib"]
        targets += [
            (
                f"full stats + percentiles, digests, init verdicts vs `{vs['ref']}`, 2 GB",
                "<= 1.3x",
                f"{ratio:.2f}x",
                ratio <= 1.3,
            ),
            ("… extra peak RSS", "within the 250 MB bound", f"{grown:+.0f} MiB", vs["ours"]["grown_mib"] <= 250),
        ]
    targets += [
        (
            "20,000 small tensors, full stats",
            "< 0.6 s",
            f"{S['ckptscope_small']['seconds']:.3f} s",
            S["ckptscope_small"]["seconds"] < 0.6,
        ),
        ("export half of 2 GB vs dd+fsync", ">= 0.9x", f"{export_gbps / dd_gbps:.2f}x", export_gbps / dd_gbps >= 0.9),
        ("export RSS over baseline", "< 64 MB", f"{E['grown_mib']:.0f} MiB", E["grown_mib"] < 64),
        ("second open: all stats (API)", "< 50 ms", ms(H["second_open_api_s"]), H["second_open_api_s"] < 0.050),
    ]
    m = r["machine"]
    lines = [
        "# ckptscope benchmarks",
        "",
        f"Measured {r['date']} by `make bench` on {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}. "
        + (
            f"GPU: {m['gpu']} (the CUDA stats path is measured below)."
            if m.get("gpu")
            else "No GPU: the optional CUDA stats path (`CKPTSCOPE_STATS_DEVICE=cuda`) was not measured; "
            "its code is tested on the CPU device."
        ),
        f"Medians of {r['runs']} fresh processes after a warm-up run (page cache warm). RSS is the peak of the "
        "operation above the process's baseline after its imports (after `import torch` where torch is used).",
        "",
        "Files (generated by `bench/files.py`, Llama-shaped: 34 layers, dim 1024, vocab 32000): "
        + ", ".join(f"`{k}` {v / 1e9:.2f} GB" for k, v in r["sizes"].items())
        + ".",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {status(ok)} |" for a, b, c, ok in targets],
        "",
        "## Listing (no tensor data read)",
        "",
        "| file | ckptscope | comparison |",
        "|---|---|---|",
        f"| 2 GB safetensors, 309 tensors | {ms(L['ckptscope_f32']['seconds'])} | safetensors `safe_open` + shapes "
        f"{ms(L['safe_open_f32']['seconds'])} |",
        f"| 20,000 tensors safetensors | {ms(L['ckptscope_small']['seconds'])} | `safe_open` + shapes "
        f"{ms(L['safe_open_small']['seconds'])} |",
        f"| 2 GB torch zip `.pt` | {ms(L['ckptscope_pt']['seconds'])} | `torch.load(mmap=True, weights_only=True)` "
        f"{ms(L['torch_mmap_pt']['seconds'])} |",
    ]
    if "ckptscope_f32x4" in L:
        lines.append(f"| 8 GB safetensors | {ms(L['ckptscope_f32x4']['seconds'])} | (size-independent) |")
    lines += [
        "",
        "## Full statistics (mean, std, min, max, L2, zeros, NaN, Inf, 64-bin histogram, exact percentiles,"
        " log-magnitude histogram, digest; the 2 GB row also the init verdicts and findings)",
        "",
        "| what | time | throughput | peak RSS over baseline |",
        "|---|---|---|---|",
        f"| ckptscope, 2 GB fp32 safetensors | {f32['seconds']:.2f} s | {rate:.2f} GB/s | {f32['grown_mib']:.0f} MiB |",
        f"| ckptscope, 1 GB bf16 safetensors | {bf16['seconds']:.2f} s | {bf16_rate:.2f} G elements/s "
        f"(fp32: {f32_rate:.2f}) | {bf16['grown_mib']:.0f} MiB |",
        f"| ckptscope, 2 GB torch zip `.pt` | {S['ckptscope_pt']['seconds']:.2f} s | "
        f"{_gbps(S['ckptscope_pt']['bytes'], S['ckptscope_pt']['seconds']):.2f} GB/s | "
        f"{S['ckptscope_pt']['grown_mib']:.0f} MiB |",
        f"| ckptscope, 20,000 small tensors | {S['ckptscope_small']['seconds']:.3f} s | | "
        f"{S['ckptscope_small']['grown_mib']:.0f} MiB |",
    ]
    if vs:
        b = vs["baseline"]
        lines.append(
            f"| `{vs['ref']}` (before percentiles, digests, init verdicts), 2 GB fp32, alternating with this "
            f"| {b['seconds']:.2f} s (this: {vs['ours']['seconds']:.2f} s) | {_gbps(b['bytes'], b['seconds']):.2f}"
            f" GB/s | {b['grown_mib']:.0f} MiB |"
        )
    if x4:
        lines.append(
            f"| ckptscope, 8 GB fp32 safetensors | {x4['seconds']:.2f} s | {_gbps(x4['bytes'], x4['seconds']):.2f}"
            f" GB/s | {x4['grown_mib']:.0f} MiB |"
        )
    if "cuda_f32" in S:
        cu = S["cuda_f32"]
        lines.append(
            f"| ckptscope CUDA path (`CKPTSCOPE_STATS_DEVICE=cuda`), 2 GB fp32 | {cu['seconds']:.2f} s | "
            f"{_gbps(cu['bytes'], cu['seconds']):.2f} GB/s | {cu['grown_mib']:.0f} MiB |"
        )
    lines += [
        f"| naive loop (`safe_open` + one torch op per stat), 2 GB | {S['naive_f32']['seconds']:.2f} s | "
        f"{naive:.2f} GB/s "
        f"| {S['naive_f32']['grown_mib']:.0f} MiB |",
        f"| machine limit: one `sum()` pass over the mapped 2 GB | {S['sum_pass_f32']['seconds']:.2f} s | "
        f"{summ:.2f} GB/s "
        f"| {S['sum_pass_f32']['grown_mib']:.0f} MiB |",
        "",
    ]
    kp = S.get("kernel_passes")
    if kp and vs:
        lines += [
            f"### Where the time goes: the kernel's passes per element, this kernel and `{vs['ref']}`'s",
            "",
            "One core, a 1 Mi-element float32 chunk in cache (`bench/kernel_passes.py`, alternating in one"
            " process): compute only; page faults and memory traffic come on top in the figures above.",
            "",
            f"| pass | `{vs['ref']}` | this |",
            "|---|---|---|",
            f"| 1: sum, min, max, non-zeros (this: + 16-bit key bins) | {kp['baseline_pass1']:.2f} ns | "
            f"{kp['pass1']:.2f} ns |",
            f"| 2: centred sums, 64-bin histogram | {kp['baseline_pass2']:.2f} ns | {kp['pass2']:.2f} ns |",
            f"| 2 with the percentiles' wanted-bin test and copies | | {kp['pass2_wanted']:.2f} ns |",
            f"| both passes | {kp['baseline_pass1'] + kp['baseline_pass2']:.2f} ns | "
            f"{kp['pass1'] + kp['pass2_wanted']:.2f} ns "
            f"({(kp['pass1'] + kp['pass2_wanted']) / (kp['baseline_pass1'] + kp['baseline_pass2']):.2f}x) |",
            "",
        ]
    lines += [
        "## Whole tools on the same files (wall time of the command, imports included)",
        "",
        "| command | 2 GB fp32 | 20,000 tensors |",
        "|---|---|---|",
    ]
    for name, label in (
        ("ckptscope_inspect", "`ckptscope inspect --json`"),
        ("weightlens", "`lens analyze` (weightlens 0.3.0)"),
    ):
        a, b = T.get(f"{name}_f32", {}), T.get(f"{name}_small", {})

        def cell(x: dict) -> str:
            return (
                f"{x['seconds']:.1f} s, {x['peak_mib']:.0f} MiB peak" if "seconds" in x else x.get("error", "n/a")[:80]
            )

        lines.append(f"| {label} | {cell(a)} | {cell(b)} |")
    lines += [
        "",
        "## Partial export (half of the 2 GB file: embeddings + first 17 layers, 1 GB)",
        "",
        "| what | time | throughput | peak RSS over baseline |",
        "|---|---|---|---|",
        "| ckptscope export (header + pread/write of merged ranges, fsync) | "
        f"{E['seconds']:.2f} s | {export_gbps:.2f} GB/s | "
        f"{E['grown_mib']:.0f} MiB |",
        f"| `dd` of the same byte ranges, `conv=fsync` | {E['dd_seconds']:.2f} s | {dd_gbps:.2f} GB/s | |",
        "",
        "## Through the HTTP API (2 GB fp32 file, real uvicorn on loopback)",
        "",
        "| step | time |",
        "|---|---|",
        f"| upload (streamed, hashed, fsynced, parsed in the sandbox) | {H['upload_s']:.2f} s |",
        f"| upload complete → module tree | {ms(H['to_tree_s'])} |",
        f"| upload complete → all stats computed | {H['to_stats_s']:.2f} s |",
        f"| second open: all tensors with stats (`/tensors?limit=5000`) | {ms(H['second_open_api_s'])} |",
        f"| second open: checkpoint page (HTML) | {ms(H['second_open_page_s'])} |",
        "",
        "## Where a target is missed, and why",
        "",
        *_misses(targets, rate, naive, summ, L, S.get("kernel_passes")),
        "",
        "Repeat: `make bench` (or `.venv/bin/python -m bench.run --runs 3`); `--quick` skips the 8 GB file. "
        "Raw numbers of this run: `bench-data/results.json`. To redraw this page from them: "
        "`python -m bench.run --report-only`.",
        "",
    ]
    return "\n".join(lines)


def _misses(
    targets: list, rate: float, naive: float, summ: float, listing: dict, kernel_passes: dict | None = None
) -> list[str]:
    missed = {name for name, _, _, ok in targets if not ok}
    out = []
    if "listing, 20,000 tensors" in missed:
        out.append(
            f"- **Listing 20,000 tensors** took {listing['ckptscope_small']['seconds'] * 1e3:.0f} ms "
            "(median of fresh processes; 72-85 ms when measured alone on the same machine). The time is the "
            "C JSON parser on a 2 MB header (~20 ms) plus building 20,000 records in Python (~3 us each), and "
            "this VM's timing noise. Next step: build records lazily. The server parses once per content and "
            "serves listings from the catalogue."
        )
    if "… vs the naive loop" in missed:
        out.append(
            f"- **vs the naive loop** {rate / naive:.1f}x instead of 8x: the naive loop here reaches "
            f"{naive:.2f} GB/s because torch's single-op reductions are fast on page-cached data and it uses "
            "both cores per op; it also needs ~2 GB of RSS, ckptscope ~50 MB. ckptscope's C kernel reads each "
            "element twice (exact two-pass variance, histogram over the final range); the first read of each page "
            "pays its page fault (~0.3 ns per element) and the histogram's scatter ~0.4 ns."
        )
    if "… vs one sum() pass" in missed:
        out.append(
            f"- **vs one sum() pass** {rate / summ:.2f}x instead of 0.10x: the bare pass runs at {summ:.1f} GB/s "
            "over a warm mapping with both cores, while full statistics need two passes (exact two-pass "
            "variance and a histogram over the final range) and a scattered histogram update per element."
        )
    baseline_row = next((name for name in missed if name.startswith("full stats + percentiles")), None)
    if baseline_row is not None:
        kp = kernel_passes or {}
        scatter = (
            f" (here {kp['pass1'] - kp['baseline_pass1']:.2f} ns per element, where the whole first pass of the"
            f" engine before took {kp['baseline_pass1']:.2f} ns)"
            if kp
            else ""
        )
        wanted = f" ({kp['pass2_wanted'] - kp['pass2']:.2f} ns)" if kp else ""
        out.append(
            "- **Percentiles, digests and init verdicts vs the engine before them**: the ratio above, measured "
            "alternating in fresh processes. Exact percentiles cost two more operations per element: pass 1 counts "
            f"every value by the top 16 bits of its order-preserving key, a scattered increment{scatter}; pass 2 "
            f"tests each value against the wanted bins with AVX2 compares and copies the few hits{wanted}; the "
            "xxh3 digest reads the bytes once more (~0.1 ns); the init verdicts and findings are Python "
            "(~0.1-0.3 ms a tensor). Bfloat16 and float8 files skip the pass-2 test (a key bin is a value). "
            "Why not 1.3x: the engine before did one scattered increment per element (its 64-bin histogram); "
            "an exact log-magnitude histogram and percentiles within the issue's rank contract need a second "
            "one, and on this CPU a scattered increment costs as much as the whole first pass. Tried and "
            "measured (2026-12-01, C microbenchmarks on this machine): 32-bit key counters, two interleaved "
            "key tables (both no faster), a bitmap of wanted bins tested with AVX2 gathers instead of compares "
            "(1.3 ns per element: slower); deriving the 64-bin histogram from the key bins was ruled out on paper "
            "(about 1 value in 8 of a uniform tensor lies in a key bin that straddles a histogram edge and needs "
            "the exact test anyway). Reaching 1.3x takes a change of contract: percentiles from a sample for "
            "tensors over 1M elements (the issue's rank bound would then hold with high probability, not always) "
            "or a log-magnitude histogram that is not exact."
        )
    if "20,000 small tensors, full stats" in missed:
        out.append(
            "- **20,000 small tensors**: each small tensor now also gets its percentiles (one sort of the batch "
            "by (tensor, key)), its magnitude histogram and its digest (one xxh3 call), and the per-tensor Python "
            "around them (records, dicts) is what shows at 20,000 tensors. Next step (issue 18): build the "
            "per-tensor records in the kernel."
        )
    if "second open: all stats (API)" in missed:
        out.append(
            "- **Second open**: a page row now carries percentiles, the digest and the init verdict (stored by "
            "the stats job, not judged per request), so the JSON of 309 rows is larger; the magnitude histogram "
            "is left to each tensor's own endpoint."
        )
    if "export half of 2 GB vs dd+fsync" in missed:
        out.append("- **export vs dd**: durable writes on this VM vary 0.4-1.5 GB/s between runs; see the rows above.")
    return out or ["- None in this run."]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=str(ROOT / "bench-data"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref whose stats engine is measured beside")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--report-only", action="store_true", help="redraw the report from results.json")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(Path(args.dir, "results.json").read_text())
    else:
        results = run(args)
        Path(args.dir, "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
