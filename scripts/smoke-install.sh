#!/usr/bin/env bash
# The runtime install without Docker: a fresh venv made by scripts/setup.sh --runtime (the first
# of the README's two commands), then `ckptscope serve` against a scratch data dir, probed like the
# image's HEALTHCHECK. CI runs this after the test suite (scripts/docker-smoke.sh tests the image).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$scratch"' EXIT
CKPTSCOPE_VENV="$scratch/venv" bash scripts/setup.sh --runtime
port=$("$scratch/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CKPTSCOPE_DATA_DIR="$scratch/data" "$scratch/venv/bin/ckptscope" serve --host 127.0.0.1 --port "$port" \
    > "$scratch/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    if "$scratch/venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 0.3
done
"$scratch/venv/bin/python" - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for path in ("/healthz", "/readyz"):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        assert r.status == 200, (path, r.status)
        print(path, json.loads(r.read()))
with urllib.request.urlopen(base + "/", timeout=5) as r:
    assert b"ckptscope" in r.read()
PY
echo "smoke-install: the Docker install path serves (setup.sh --runtime + ckptscope serve)"
