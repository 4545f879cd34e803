"""Uploads against the disk: an HTTP upload's stored-and-fsynced time beside ``dd conv=fsync``.

    python -m bench.uploads [--runs 5] [--quick] [--dir bench-data/uploads] [--out BENCHMARKS.md]

One generated safetensors file (2.0 GB; ``--quick``: 0.5 GB), page-cache warm. Each round, in
fresh processes, alternates (a) ``dd if=FILE of=DIR/x bs=8M conv=fsync`` into the filesystem of
the blob store, (b) a raw-body upload (``POST /api/v1/checkpoints?filename=``) and (c) a multipart
upload (field ``file``), each to a fresh ``ckptscope serve`` on loopback, streamed by httpx.

The route answers after the sandboxed parse, so an upload is timed from its first byte to the
moment its blob was renamed into place (the rename follows the one fsync): the blob's ctime, which
the rename sets (the kernel's coarse clock, a few ms). The parse is the rest, to the response.
Medians after one warm-up round; rewrites only its own section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.files import llm_shapes, write_safetensors
from bench.run import _free_port
from bench.sections import write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- uploads:begin -->", "<!-- uploads:end -->"
TARGET = 0.9  # issue 18: an upload at least 0.9x of dd conv=fsync writing the same bytes


def make_file(d: Path, quick: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("upload-0.5g.safetensors" if quick else "upload-2g.safetensors")
    if not path.exists():
        part = path.with_suffix(".part")
        write_safetensors(part, llm_shapes(layers=5) if quick else llm_shapes())
        part.rename(path)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def time_dd(src: Path, workdir: Path) -> float:
    out = workdir / "dd-target"
    out.mkdir(parents=True, exist_ok=True)
    target = out / "x"
    target.unlink(missing_ok=True)
    os.sync()
    t = time.perf_counter()
    subprocess.run(
        ["dd", f"if={src}", f"of={target}", "bs=8M", "conv=fsync"], check=True, capture_output=True, timeout=1800
    )
    seconds = time.perf_counter() - t
    target.unlink()
    return seconds


def time_upload(src: Path, sha: str, workdir: Path, multipart: bool) -> dict[str, float]:
    """One upload to a fresh server: seconds to the blob in place, and from there to the response."""
    data = workdir / "server-data"
    shutil.rmtree(data, ignore_errors=True)
    port = _free_port()
    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(data)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptscope.cli", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800) as client:
            for _ in range(600):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # FastAPI builds a router's routes on its first request (~1 s here): not the upload's cost
            client.get("/api/v1/checkpoints").raise_for_status()
            os.sync()
            with src.open("rb") as fh:
                cpu0 = cpu_seconds(proc.pid)
                wall0, t0 = time.time(), time.perf_counter()
                if multipart:
                    r = client.post("/api/v1/checkpoints", files={"file": (src.name, fh, "application/octet-stream")})
                else:
                    r = client.post("/api/v1/checkpoints", params={"filename": src.name}, content=fh)
                answered = time.perf_counter() - t0
                cpu = cpu_seconds(proc.pid) - cpu0
            r.raise_for_status()
        placed = (data / "blobs" / sha[:2] / sha).stat().st_ctime - wall0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)
    return {"stored_s": placed, "parse_s": answered - placed, "response_s": answered, "server_cpu_s": cpu}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used: the server's cost of an upload,
    which a machine shared with other work does not blur the way it blurs wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.dir)
    src = make_file(workdir, args.quick)
    sha = sha256_of(src)
    load_before = os.getloadavg()[0]
    dd: list[float] = []
    raw: list[dict[str, float]] = []
    multi: list[dict[str, float]] = []
    for i in range(args.runs + 1):  # round 0 warms up (page cache, imports) and is dropped
        round_ = (time_dd(src, workdir), time_upload(src, sha, workdir, False), time_upload(src, sha, workdir, True))
        print(f"round {i}: dd {round_[0]:.2f} s, raw {round_[1]}, multipart {round_[2]}", file=sys.stderr)
        if i:
            dd.append(round_[0])
            raw.append(round_[1])
            multi.append(round_[2])

    def med(results: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in results) for k in results[0]}

    return {
        "bytes": src.stat().st_size,
        "runs": args.runs,
        "dd_s": statistics.median(dd),
        "dd_all": [round(x, 3) for x in dd],
        "raw": med(raw),
        "raw_all": [round(r["stored_s"], 3) for r in raw],
        "multipart": med(multi),
        "multipart_all": [round(r["stored_s"], 3) for r in multi],
        "load": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # other work on the machine
    }


def report(r: dict) -> str:
    gb = r["bytes"] / 1e9
    load = " → ".join(str(x) for x in r.get("load", [])) or "not recorded"

    def row(label: str, key: str) -> str:
        stored = r[key]["stored_s"]
        ratio = r["dd_s"] / stored
        met = "met" if ratio >= TARGET else "**missed**"
        line = (
            f"| {label}: dd time / upload time | >= {TARGET}x | {ratio:.2f}x ({stored:.2f} s, "
            f"{gb / stored:.2f} GB/s) | {met} |"
        )
        if ratio < TARGET:
            line = line[:-2] + (
                f": short by {TARGET - ratio:.2f}x: the upload needs CPU that dd does not (the server "
                f"used {r[key]['server_cpu_s']:.1f} s of CPU, plus the httpx client's), and on this 2-core "
                "machine it shares the cores with the client and with whatever else runs (load average "
                f"{load}), while dd mostly waits on the disk"
            )
            if key == "multipart":
                extra = r["multipart"]["server_cpu_s"] - r["raw"]["server_cpu_s"]
                line += (
                    f". Multipart took {extra:.1f} s more server CPU than the raw body; python-multipart's "
                    "own parse is not most of it (it finds the boundary with bytes.find: ~0.08 s of CPU per "
                    "0.5 GB in ~2,100 body messages, within 10% of a bare bytes.find scan), and the rest is "
                    "not yet accounted for"
                )
            line += " |"
        return line

    lines = [
        BEGIN,
        f"## Uploads against the disk (issue 18; {gb:.2f} GB safetensors, real uvicorn on loopback)",
        "",
        f"Medians of {r['runs']} rounds after a warm-up; each round runs dd, a raw-body upload and a "
        "multipart upload, each in a fresh process (a fresh server per upload), page cache warm for the "
        "source. An upload is timed from its first byte to its blob's rename into place (after the one "
        "fsync; the blob's ctime); the sandboxed parse that follows, before the response, is counted "
        "apart. `python -m bench.uploads` regenerates this section.",
        "",
        "| target | wanted | measured | |",
        "|---|---|---|---|",
        row("raw body", "raw"),
        row("multipart", "multipart"),
        "",
        "| measurement | value |",
        "|---|---|",
        f"| `dd if=FILE of=DIR/x bs=8M conv=fsync` | {r['dd_s']:.2f} s "
        f"({gb / r['dd_s']:.2f} GB/s; runs {r['dd_all']}) |",
        f"| raw body, first byte → stored and fsynced | {r['raw']['stored_s']:.2f} s (runs {r['raw_all']}) |",
        f"| multipart, first byte → stored and fsynced | {r['multipart']['stored_s']:.2f} s "
        f"(runs {r['multipart_all']}) |",
        f"| server CPU per upload, all threads (raw / multipart) | {r['raw']['server_cpu_s']:.2f} s / "
        f"{r['multipart']['server_cpu_s']:.2f} s ({gb / r['raw']['server_cpu_s']:.2f} / "
        f"{gb / r['multipart']['server_cpu_s']:.2f} GB per CPU-second) |",
        f"| load average of the machine (start → end of the run) | {load} |",
        f"| sandboxed parse after the upload (raw / multipart), to the response | "
        f"{r['raw']['parse_s'] * 1000:.0f} ms / {r['multipart']['parse_s'] * 1000:.0f} ms |",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=str(ROOT / "bench-data" / "uploads"))
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = run(args)
    write_section(Path(args.out), report(results), BEGIN, END)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
