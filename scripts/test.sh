#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite (unit, API, end-to-end browser).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
py="${CKPTSCOPE_VENV:-.venv}/bin/python"
[ "${CKPTSCOPE_VENV:-}" = "system" ] && py=python3
"$py" -m ruff check app tests scripts
exec "$py" -m pytest "$@"
