#!/usr/bin/env bash
# Set up ckptscope in a virtual environment. Used by the README and .ci/run,
# so all three install the same way.
#   scripts/setup.sh [--runtime]   runtime only, a regular install (scripts/smoke-install.sh checks it)
#   scripts/setup.sh --test        an editable install with the test tools and Debian's chromium for browser tests
# Environment:
#   CKPTSCOPE_VENV  where the venv goes (default .venv; "system" installs into the current python)
#   TORCH_SPEC      the torch requirement installed first (default torch==2.13.0, a CPU build where
#                   a local wheel or wheelhouse provides it; point PIP_FIND_LINKS at a wheelhouse)
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
case "${1:---runtime}" in
    --test) with_tests=1 ;;
    --runtime) ;;
    *) echo "usage: scripts/setup.sh [--runtime|--test]" >&2; exit 2 ;;
esac
venv="${CKPTSCOPE_VENV:-.venv}"
if [ "$venv" = "system" ]; then
    py=python3
else
    if [ ! -x "$venv/bin/python" ]; then
        "$(command -v python3.11 || command -v python3)" -m venv "$venv"
    fi
    py="$venv/bin/python"
fi
# The stats kernel (ckptscope/stats/_kernel.c) is compiled at install: a C compiler is needed.
# Where there is none (a slim image), as root it comes from Debian's packages.
if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev) >/dev/null
    else
        echo "setup: a C compiler (cc) is needed to build the stats kernel; install gcc" >&2
        exit 1
    fi
fi
pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first, pinned: an unpinned torch>=2.10 in an empty venv pulls a multi-GB CUDA build.
pip_install "${TORCH_SPEC:-torch==2.13.0}"
if [ "$with_tests" = 1 ]; then
    # torch pinned on the same line as the test extras' producer libraries, so none of them can
    # move it
    pip_install "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"
    if ! command -v chromium >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
        else
            echo "setup: chromium is missing; install Debian's chromium package for browser tests" >&2
        fi
    fi
else
    pip_install .  # a regular install: the package carries its templates, static files and kernel
fi
echo "setup: ready ($py)"
