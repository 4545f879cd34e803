#!/usr/bin/env bash
# The package as users get it: a wheel (pip wheel . --no-deps) installed non-editable into a fresh
# venv, served from a folder outside the source tree, its home page, an uploaded checkpoint's page
# and stats checked. Twice: a wheel with the C kernel, then one built where no C compiler exists
# (CC=/bin/false), which must install, log that the torch-op fallback engine runs, and compute the
# same stats. CI runs this after the test suite.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$scratch"' EXIT
py="$(command -v python3.11 || command -v python3)"
quiet=(--quiet --disable-pip-version-check)
build_wheel() {  # $1: output folder; from a clean copy of the source (no build/ or built kernel to reuse)
    rm -rf "$scratch/src" && mkdir "$scratch/src"
    tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./data --exclude=./bench-data \
        --exclude=./test-artifacts --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ -cf - . |
        tar -C "$scratch/src" -xf -
    "$py" -m pip wheel "${quiet[@]}" "$scratch/src" --no-deps -w "$1"
}
build_wheel "$scratch/kernel"
CC=/bin/false build_wheel "$scratch/fallback" 2>/dev/null
"$py" -m venv "$scratch/venv"
venv_py="$scratch/venv/bin/python"
"$venv_py" -m pip install "${quiet[@]}" "${TORCH_SPEC:-torch==2.13.0}"
cd "$scratch"  # nothing of the source tree is importable from here

serve_and_probe() {  # $1: the engine the log must name
    local port
    port=$("$venv_py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    rm -rf "$scratch/data"
    CKPTSCOPE_DATA_DIR="$scratch/data" "$scratch/venv/bin/ckptscope" serve --host 127.0.0.1 --port "$port" \
        > "$scratch/server.log" 2>&1 &
    pid=$!
    "$venv_py" - "$port" "$1" "$scratch/server.log" <<'PY'
import json, sys, time, urllib.request
import torch
import ckptscope

port, engine, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
assert "site-packages" in ckptscope.__file__, ckptscope.__file__  # the installed wheel, not a checkout
base = f"http://127.0.0.1:{port}"

def get(path, data=None, headers=None):
    request = urllib.request.Request(base + path, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, r.read()

for _ in range(200):
    try:
        get("/healthz")
        break
    except OSError:
        time.sleep(0.2)
status, home = get("/")
assert status == 200 and b"ckptscope" in home and b"/static/vendor/htmx/htmx.min.js" in home
assert get("/static/app.css")[0] == 200 and get("/static/vendor/htmx/htmx.min.js")[0] == 200
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
torch.save(model.state_dict(), "tiny.pt")
with open("tiny.pt", "rb") as fh:
    _, body = get("/api/v1/checkpoints?filename=tiny.pt", fh.read(), {"Content-Type": "application/octet-stream"})
ckpt = json.loads(body)
for _ in range(200):
    state = json.loads(get(f"/api/v1/checkpoints/{ckpt['id']}")[1])["stats_state"]
    if state in ("done", "failed"):
        break
    time.sleep(0.1)
assert state == "done", state
status, page = get(f"/checkpoints/{ckpt['id']}")
assert status == 200 and b"0.weight" in page and b"tiny.pt" in page
tensors = json.loads(get(f"/api/v1/checkpoints/{ckpt['id']}/tensors?limit=10")[1])["tensors"]
weight = next(t for t in tensors if t["name"] == "0.weight")
expected = model.state_dict()["0.weight"].double()
assert abs(weight["stats"]["mean"] - expected.mean().item()) < 1e-9 and abs(weight["stats"]["std"] - expected.std().item()) < 1e-9
log = open(log_path).read()
assert f"stats engine: {engine}" in log, log[-2000:]
print(f"smoke-wheel: served from the wheel, stats by {engine!r}")
PY
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

"$venv_py" -m pip install "${quiet[@]}" "$scratch"/kernel/*.whl
serve_and_probe "the C kernel on the CPU"
"$venv_py" -m pip install "${quiet[@]}" --force-reinstall --no-deps "$scratch"/fallback/*.whl
if "$venv_py" -c "import ckptscope.stats._kernel" 2>/dev/null; then
    echo "smoke-wheel: the wheel built without a compiler carries a kernel" >&2
    exit 1
fi
serve_and_probe "torch ops on the CPU (fallback"
echo "smoke-wheel: both wheels install and serve the UI"
