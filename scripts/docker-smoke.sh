#!/usr/bin/env bash
# CI: the Dockerfile built and run on a real engine. Starts a private dockerd (own data root, exec
# root and socket, no iptables, no bridge: the host's own docker, if any, is never touched), builds
# the stand-in base (scripts/docker-base.sh: no registry is reachable), builds the image with the
# legacy builder, then checks the image and containers (--network none, reached through their
# network namespace with nsenter, root filesystem read-only): one line per check, the time of each
# stage, a non-zero exit on any failure, and everything torn down (containers, dockerd, its data
# root, the files lent to the build context) whatever happens.
#   CKPTSCOPE_DOCKER_KEEP=1   keep the work folder (logs, data root) for a look afterwards
# Needs root; installs Debian's docker.io and debootstrap when they are missing.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0))s"; }
stage() { echo "docker-smoke: [$(elapsed)] $*"; }
fail() { echo "docker-smoke: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (a private dockerd)"
for tool in dockerd debootstrap curl nsenter; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        stage "installing docker.io and debootstrap"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io debootstrap curl util-linux ca-certificates) >/dev/null
        break
    fi
done
# Debian's client, the daemon's own version (another docker CLI on PATH may be newer)
docker_cli=/usr/bin/docker
[ -x "$docker_cli" ] || docker_cli=$(command -v docker)

work=$(mktemp -d /var/tmp/ckptscope-docker.XXXXXX)
sock="$work/docker.sock"
lent=()  # files put into the build context for this build only
dockerd_pid=
cleanup() {
    local status=$?
    set +e
    if [ -n "$dockerd_pid" ]; then
        # shellcheck disable=SC2046
        d rm -f $(d ps -aq) >/dev/null 2>&1
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$dockerd_pid" 2>/dev/null
        wait "$dockerd_pid" 2>/dev/null
    fi
    # the managed containerd and any shim left, by the pids recorded under our exec root
    for pidfile in $(find "$work/exec" -name '*.pid' 2>/dev/null); do
        kill -9 "$(cat "$pidfile")" 2>/dev/null
    done
    grep -o " $work[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    for file in "${lent[@]}"; do rm -f "$file"; done
    if [ "${CKPTSCOPE_DOCKER_KEEP:-0}" = 1 ]; then
        echo "docker-smoke: kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
d() { DOCKER_HOST="unix://$sock" "$docker_cli" "$@"; }

stage "starting a private dockerd ($work)"
dockerd --iptables=false --ip6tables=false --bridge=none --data-root "$work/root" --exec-root "$work/exec" \
    --pidfile "$work/dockerd.pid" --host "unix://$sock" >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 1 150); do d version >/dev/null 2>&1 && break; sleep 0.2; done
d version >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not start"; }

stage "building the stand-in base python:3.11-slim (debootstrap)"
DOCKER="$docker_cli" DOCKER_HOST="unix://$sock" bash "$repo/scripts/docker-base.sh" python:3.11-slim

# This host's pip settings, lent to the build: its CA bundle (TLS-inspecting egress), its
# constraints, index URLs other than file:// ones (which mean nothing inside the build), and the
# CPU torch wheel from its find-links folders.
pip_conf=$(python3 -m pip config list 2>/dev/null || true)
pip_get() { printf '%s\n' "$pip_conf" | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | tail -1; }
lend() {  # $1: a file on this host, $2: its name in wheelhouse/ (never replacing one already there)
    local target="$repo/wheelhouse/$2"
    [ -f "$1" ] && [ ! -e "$target" ] || return 0
    ln "$1" "$target" 2>/dev/null || cp "$1" "$target"
    lent+=("$target")
}
lend "${PIP_CERT:-$(pip_get cert)}" ca-bundle.crt
lend "${PIP_CONSTRAINT:-$(pip_get constraint)}" constraints.txt
build_args=(--build-arg BASE_IMAGE=python:3.11-slim)
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$repo/Dockerfile")
for folder in ${PIP_FIND_LINKS:-} $(pip_get find-links); do
    for wheel in "$folder"/torch-"$torch_version"+cpu-cp311-cp311-manylinux*_x86_64.whl; do
        [ -f "$wheel" ] || continue
        lend "$wheel" "$(basename "$wheel")"
        build_args+=(--build-arg TORCH_INDEX_URL=none)  # the wheel is here: no torch index needed
        break 2
    done
done
for name in index-url extra-index-url; do
    urls=""
    for url in $(pip_get "$name"); do [[ "$url" == file:* ]] || urls="$urls $url"; done
    arg=PIP_$(echo "$name" | tr a-z- A-Z_)
    [ -z "${urls# }" ] || build_args+=(--build-arg "$arg=${urls# }")
done

stage "building the image (legacy builder, --network host)"
timed() {  # each line of the build's output with its second; Dockerfile steps of 5 s or more told
    local start step="" step_at=0 now
    start=$(date +%s)
    while IFS= read -r line; do
        now=$(($(date +%s) - start))
        printf '%4ds %s\n' "$now" "$line" >>"$work/build.log"
        if [[ "$line" == Step* ]]; then
            [ -n "$step" ] && [ $((now - step_at)) -ge 5 ] && echo "docker-smoke:   $((now - step_at))s  ${step:0:90}"
            step=$line step_at=$now
        fi
    done
    [ -n "$step" ] && [ $((now - step_at)) -ge 5 ] && echo "docker-smoke:   $((now - step_at))s  ${step:0:90}"
    return 0
}
if ! DOCKER_BUILDKIT=0 d build --network host "${build_args[@]}" -t ckptscope:smoke "$repo" 2>&1 | timed ||
    ! d image inspect ckptscope:smoke >/dev/null 2>&1; then
    tail -40 "$work/build.log" >&2
    fail "docker build failed"
fi
# --- the checks -------------------------------------------------------------------------------
failures=0
check() {  # $1: what is checked; the rest: a command that fails when it does not hold
    local what=$1
    shift
    local out
    if out=$("$@" 2>&1); then
        echo "docker-smoke: ok    $what"
    else
        echo "docker-smoke: FAIL  $what"
        printf '%s\n' "$out" | tail -15 | sed 's/^/    /'
        failures=$((failures + 1))
    fi
}
stage "built ckptscope:smoke"

# the layer order: an edit to ckptscope/ (here in a copy of the build context) rebuilds the
# project's layer only, not torch's or the other dependencies'
stage "rebuilding the build stage after an edit to ckptscope/"
ctx="$work/edited"
mkdir -p "$ctx"
cp -a "$repo/Dockerfile" "$repo/.dockerignore" "$repo/pyproject.toml" "$repo/setup.py" "$repo/README.md" \
    "$repo/ckptscope" "$ctx/"
cp -al "$repo/wheelhouse" "$ctx/" 2>/dev/null || cp -a "$repo/wheelhouse" "$ctx/"
echo "# an edit" >>"$ctx/ckptscope/__init__.py"
DOCKER_BUILDKIT=0 d build --network host "${build_args[@]}" --target build -t ckptscope:edited "$ctx" \
    >"$work/rebuild.log" 2>&1 || true
cached() {  # the Dockerfile step whose line contains $1: "cached" or "built"
    awk -v want="$1" '/^Step /{ if (step) print state; step = index($0, want) > 0; state = "built"; next }
        step && /Using cache/ { state = "cached" } END { if (step) print state }' "$work/rebuild.log"
}
layer_order() {
    local torch deps project
    torch=$(cached 'pip install --quiet --no-compile "$@"')
    deps=$(cached 'pip install --quiet --no-compile -r')
    project=$(cached 'pip wheel')
    echo "torch: $torch, dependencies: $deps, project: $project"
    [ "$torch" = cached ] && [ "$deps" = cached ] && [ "$project" = built ]
}
check "an edit to ckptscope/ rebuilds the project layer only (torch and the dependencies cached)" layer_order
rm -rf "$ctx"
d rmi ckptscope:edited >/dev/null 2>&1 || true
for file in "${lent[@]}"; do rm -f "$file"; done
lent=()
stage "image size ($(d image inspect -f '{{.Size}}' ckptscope:smoke | awk '{printf "%.0f MB", $1/1e6}'))"

token=smoke-token
volume=ckptscope-smoke
run_service() {  # $1: container name, then extra `docker run` options
    local name=$1
    shift
    d run -d --name "$name" --network none --read-only --tmpfs /tmp:rw,nosuid,size=256m \
        --health-interval 1s --health-start-period 60s \
        -v "$volume:/data" -e CKPTSCOPE_API_TOKEN="$token" "$@" ckptscope:smoke >/dev/null
}
pid_of() { d inspect -f '{{.State.Pid}}' "$1"; }
http() {  # $1: container, $2: port, then curl arguments (path last)
    local container=$1 port=$2
    shift 2
    local args=("$@")
    local path=${args[-1]}
    unset 'args[-1]'
    nsenter -t "$(pid_of "$container")" -n curl -sS -f --max-time 120 -H "Authorization: Bearer $token" \
        "${args[@]}" "http://127.0.0.1:$port$path"
}
wait_http() {  # $1: container, $2: port, $3: path; up to 90 s
    for _ in $(seq 1 450); do
        http "$1" "$2" "$3" >/dev/null 2>&1 && return 0
        [ "$(d inspect -f '{{.State.Running}}' "$1")" = true ] || break
        sleep 0.2
    done
    d logs "$1" 2>&1 | tail -20
    return 1
}
json() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }

in_image() { d run --rm --network none --entrypoint sh ckptscope:smoke -c "$1"; }
check "the image carries the venv only: no wheel, no wheelhouse, no source tree, no compiler" \
    in_image '! find / -xdev -name "torch-*.whl" | grep . && [ ! -e /wheelhouse ] && [ ! -e /src ] && ! command -v cc && [ -x /opt/venv/bin/ckptscope ]'
check "ckptscope is installed from a wheel (not editable), with numpy and the C kernel" \
    in_image 'cd / && python -c "import ckptscope, ckptscope.stats._kernel, numpy; assert \"/site-packages/\" in ckptscope.__file__, ckptscope.__file__" &&
              ! find /opt/venv -name "__editable__*" -o -name "*.egg-link" | grep .'
check "the image's user is the fixed 10001:10001" \
    test "$(d image inspect -f '{{.Config.User}}' ckptscope:smoke)" = "10001:10001"

stage "checks on a running container"
mkdir -p "$work/files"
d run --rm --network none --user 0 --entrypoint python -v "$work/files:/out" ckptscope:smoke -c '
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
torch.save(model.state_dict(), "/out/tiny.pt")'
head -c $((48 << 20)) /dev/urandom >"$work/files/slow.bin"

run_service smoke-a
check "/healthz answers (read-only root filesystem, tmpfs /tmp)" wait_http smoke-a 8000 /healthz
check "/readyz answers" http smoke-a 8000 /readyz
uid_gid() { awk '/^Uid:/{u=$2} /^Gid:/{g=$2} END{print u":"g}' "/proc/$(pid_of smoke-a)/status"; }
check "the server runs as 10001:10001, not root" test "$(uid_gid)" = "10001:10001"
read_only() { ! d exec smoke-a sh -c 'echo x > /opt/venv/x' 2>/dev/null; }
check "the root filesystem is read-only" read_only
logs_of() { d logs "$1" 2>&1; }  # grep reads it whole (a `| grep -q` pipeline fails under pipefail)
host_env() {
    grep -q 'serving on 0.0.0.0:8000' <<<"$(logs_of smoke-a)" &&
        ! grep -q -- --host <<<"$(d inspect -f '{{json .Config.Cmd}}' smoke-a)"
}
check "CKPTSCOPE_HOST is honoured (0.0.0.0, no --host in the CMD)" host_env
quiet_start() { ! grep -i -E 'numpy|traceback' <<<"$(logs_of smoke-a)"; }
check "no numpy warning and no traceback at start" quiet_start
upload() {
    http smoke-a 8000 -F "file=@$work/files/tiny.pt" "/api/v1/checkpoints?filename=tiny.pt" >"$work/upload.json" || return 1
    local ckpt
    ckpt=$(json "['id']" <"$work/upload.json")
    for _ in $(seq 1 300); do
        state=$(http smoke-a 8000 "/api/v1/checkpoints/$ckpt" | json "['stats_state']")
        [ "$state" = done ] && return 0
        [ "$state" = failed ] && break
        sleep 0.2
    done
    echo "stats_state: $state"
    return 1
}
check "an upload with curl (multipart) succeeds and its stats reach done" upload

# docker stop while a slow upload (48 MB at 1 MB/s) is in flight
http smoke-a 8000 --limit-rate 1M -H 'Content-Type: application/octet-stream' --data-binary "@$work/files/slow.bin" \
    "/api/v1/checkpoints?filename=slow.bin" >/dev/null 2>&1 &
slow=$!
vol_dir=$(d volume inspect -f '{{.Mountpoint}}' "$volume")
in_flight() { for _ in $(seq 1 100); do compgen -G "$vol_dir/tmp/upload-*" >/dev/null && return 0; sleep 0.1; done; return 1; }
check "a slow upload is being written (its temp file is in data/tmp)" in_flight
sleep 1
stop_start=$(date +%s.%N)
d stop smoke-a >/dev/null
stop_s=$(python3 -c "print(round($(date +%s.%N) - $stop_start, 1))")
wait "$slow" 2>/dev/null || true
clean_stop() {
    local code
    code=$(d inspect -f '{{.State.ExitCode}}' smoke-a)
    echo "exit code $code after $stop_s s"
    [ "$code" = 0 ] && python3 -c "import sys; sys.exit(float(sys.argv[1]) >= 10)" "$stop_s"
}
check "docker stop during the upload: exit code 0, within Docker's 10 s grace (${stop_s} s)" clean_stop
no_partial() { ! ls -A "$vol_dir/tmp" | grep .; }
check "no partial upload left in data/tmp" no_partial
logged_stop() {
    local log
    log=$(logs_of smoke-a)
    grep -q 'Application shutdown complete' <<<"$log" && ! grep -i traceback <<<"$log"
}
check "the shutdown is logged, no traceback" logged_stop

# a temp file a killed server left behind: removed at the next start
touch "$vol_dir/tmp/upload-leftover" && chown 10001:10001 "$vol_dir/tmp/upload-leftover"
stage "a new container on the same volume, CKPTSCOPE_PORT=8123"
run_service smoke-b -e CKPTSCOPE_PORT=8123
check "the new container serves on CKPTSCOPE_PORT" wait_http smoke-b 8123 /readyz
keeps() {
    local ckpt
    ckpt=$(json "['id']" <"$work/upload.json") &&
        [ "$(http smoke-b 8123 "/api/v1/checkpoints/$ckpt" | json "['stats_state']")" = done ]
}
check "a restart (new container, same volume) keeps the checkpoint and its stats" keeps
check "an unheld temp file left in data/tmp is cleaned at start" test ! -e "$vol_dir/tmp/upload-leftover"
healthy() {
    for _ in $(seq 1 60); do
        status=$(d inspect -f '{{.State.Health.Status}}' smoke-b)
        [ "$status" = healthy ] && return 0
        sleep 1
    done
    echo "health: $status"
    d inspect -f '{{json .State.Health}}' smoke-b
    return 1
}
check "HEALTHCHECK becomes healthy with CKPTSCOPE_PORT=8123" healthy
d rm -f smoke-b >/dev/null

unwritable() {
    local out status=0
    out=$(d run --rm --network none --read-only --tmpfs /tmp --tmpfs /data:rw,mode=0755 ckptscope:smoke 2>&1) || status=$?
    echo "exit $status: $out"
    [ "$status" != 0 ] && ! grep -q -i traceback <<<"$out" &&
        [ "$(grep -c . <<<"$out")" = 1 ] && grep -q "data directory /data" <<<"$out"
}
check "an unwritable data dir: one line and a non-zero exit, no traceback" unwritable
echo "docker-smoke: -     the CUDA image (--build-arg TORCH_VARIANT=cuda) is not built here: no GPU"

stage "done: $failures failed check(s)"
[ "$failures" = 0 ]
