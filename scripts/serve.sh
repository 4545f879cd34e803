#!/usr/bin/env bash
# Set up ckptscope (first run only does real work) and start the server on the embedded
# defaults: SQLite catalogue and blobs under ./data, http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CKPTSCOPE_VENV:-.venv}/bin/ckptscope" serve "$@"
