#!/usr/bin/env bash
# Bounded coverage-guided fuzzing (atheris/libFuzzer, fuzz/): the checkpoint readers, the C stats
# kernel, then the kernel's corpus replayed and mutated through an ASan+UBSan build of the kernel.
# The seed corpora are generated first (fuzz/seeds.py: small valid files, probes, the hostile
# corpus). Any finding fails the script (exit 1), printing the crashing input's path, the
# exception and the command that replays it.
#
#   bash scripts/fuzz.sh
#
#   CKPTSCOPE_FUZZ_SECONDS    seconds per harness (default 60; three runs)
#   CKPTSCOPE_FUZZ_TIMEOUT    seconds one input may take (default 10)
#   CKPTSCOPE_FUZZ_SEED       libFuzzer's mutation seed (default 1, so CI repeats; 0 for a random one)
#   CKPTSCOPE_FUZZ_ARTIFACTS  findings and logs (default test-artifacts/fuzz, git-ignored)
#   CKPTSCOPE_FUZZ_CORPUS     keep the grown corpora there across runs (default: a temp dir)
#   CKPTSCOPE_FUZZ_ASAN=0     skip the sanitized kernel run (it is skipped anyway without gcc/libasan)
#   PYTHON                    an interpreter with ckptscope[test] installed (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-.venv/bin/python}
seconds=${CKPTSCOPE_FUZZ_SECONDS:-60}
seed=${CKPTSCOPE_FUZZ_SEED:-1}  # a fixed mutation seed: CI's runs repeat; 0 = a new one each run
timeout=${CKPTSCOPE_FUZZ_TIMEOUT:-10}
artifacts=${CKPTSCOPE_FUZZ_ARTIFACTS:-test-artifacts/fuzz}
mkdir -p "$artifacts"
artifacts=$(cd "$artifacts" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ckptscope-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
corpora=${CKPTSCOPE_FUZZ_CORPUS:-$work/corpus}

if ! "$py" -c 'import atheris' 2>/dev/null; then
    echo "fuzz.sh: atheris is not installed in $py (pip install -e '.[test]')" >&2
    exit 2
fi
echo "== seeds"
"$py" -W ignore -m fuzz.seeds "$work/seeds"

failed=0

# run NAME MODULE MAX_LEN CORPUS SEEDS [NAME=VALUE ...] [-- LIBFUZZER_FLAG ...]
run() {
    local name=$1 module=$2 max_len=$3 corpus=$corpora/$4 seeds=$5
    shift 5
    local envs=() flags=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    flags=("$@")
    local log="$artifacts/$name.log" inputs="$work/inputs-$name"
    mkdir -p "$corpus"
    rm -f "$artifacts/$name"-*
    echo "== $name: ${seconds}s (log: $log)"
    local rc=0
    env "${envs[@]}" CKPTSCOPE_FUZZ_WORKDIR="$inputs" "$py" -m "fuzz.$module" \
        -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 -max_len="$max_len" -seed="$seed" \
        -artifact_prefix="$artifacts/$name-" -print_final_stats=1 "${flags[@]}" "$corpus" "$seeds" \
        >"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        grep -a -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
        grep -a -E '^stat::number_of_executed_units' "$log" || true
        return 0
    fi
    failed=1
    echo "!! $name: FINDING (exit status $rc)"
    local report
    report=$(grep -a -A 30 -E 'Uncaught Python exception|ERROR: AddressSanitizer|runtime error:|ERROR: libFuzzer' "$log" |
        grep -a -v -E '^(INFO|MS:|#[0-9])' | head -n 60 || true)
    if [ -n "$report" ]; then echo "$report"; else tail -n 15 "$log"; fi
    local unit
    unit=$(grep -a -o 'Test unit written to .*' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)
    if [ -z "$unit" ] && [ -e "$inputs/input" ]; then
        # killed before libFuzzer could write it (a C stack overflow): the harness's last input
        unit="$artifacts/$name-last-input"
        cp "$inputs/input" "$unit"
        [ -e "$inputs/shard" ] && cp "$inputs/shard" "$unit.shard"
    fi
    echo "!! crashing input: ${unit:-unknown (see $log)}"
    [ -n "$unit" ] && echo "!! replay: ${envs[*]:+${envs[*]} }$py -m fuzz.$module $unit"
    return 0
}

run readers fuzz_readers 524288 readers "$work/seeds/readers"
run kernel fuzz_kernel 4096 kernel "$work/seeds/kernel"

if [ "${CKPTSCOPE_FUZZ_ASAN:-1}" != "0" ]; then
    rc=0
    out=$("$py" -m fuzz.sanitized_kernel "$work/asan" 2>"$work/asan.err") || rc=$?
    if [ "$rc" -eq 0 ]; then
        mapfile -t asan_env <<<"$out"
        # under LD_PRELOAD libFuzzer's coverage hooks resolve to libasan's, so this run mutates
        # without coverage: -keep_seed keeps the kernel corpus grown above as its starting points
        run asan-kernel fuzz_kernel 4096 kernel "$work/seeds/kernel" "${asan_env[@]}" -- -keep_seed=1
    elif [ "$rc" -eq 3 ]; then
        echo "== asan-kernel: skipped ($(cat "$work/asan.err"))"
    else
        cat "$work/asan.err" >&2
        failed=1
    fi
fi

if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: findings above; inputs and logs in $artifacts" >&2
    exit 1
fi
echo "fuzz.sh: no findings"
