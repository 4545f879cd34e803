#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite (unit, API, end-to-end browser,
# several server processes) on SQLite, then every test that reaches the catalogue again on a
# throwaway PostgreSQL server (scripts/with-postgres.sh installs Debian's postgresql when run as
# root). The readers', stats engine's and insights' tests (tests/formats, tests/stats,
# tests/insights) never open a catalogue (tests/test_layering.py keeps those packages off the
# store), so the PostgreSQL pass leaves them out.
#   CKPTSCOPE_POSTGRES=skip      run the SQLite pass only
#   CKPTSCOPE_POSTGRES=required  fail when PostgreSQL cannot be set up (CI sets this)
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
py="${CKPTSCOPE_VENV:-.venv}/bin/python"
[ "${CKPTSCOPE_VENV:-}" = "system" ] && py=python3
"$py" -m ruff check ckptscope tests scripts bench fuzz
"$py" -m mypy  # strict, on the package ([tool.mypy] in pyproject.toml)
echo "== tests on SQLite"
"$py" -m pytest "$@"
mode="${CKPTSCOPE_POSTGRES:-auto}"
[ "$mode" = skip ] && exit 0
echo "== tests on PostgreSQL"
status=0
catalogue_free=(--ignore=tests/formats --ignore=tests/stats --ignore=tests/insights)
bash scripts/with-postgres.sh "$py" -m pytest "${catalogue_free[@]}" "$@" || status=$?
if [ "$status" = 75 ] && [ "$mode" != required ]; then
    echo "test: PostgreSQL is not available here; only the SQLite pass ran (CI runs both)" >&2
    exit 0
fi
exit "$status"
