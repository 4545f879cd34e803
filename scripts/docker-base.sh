#!/usr/bin/env bash
# A CI device: builds a local stand-in for the Dockerfile's base image, python:3.11-slim, where no
# registry can be reached (the real base is pinned by digest in the Dockerfile; see README "Docker").
# Debian bookworm minbase (debootstrap) with Debian's Python 3.11, python3-venv, libpython3.11-dev and
# ca-certificates, /usr/local/bin/python -> python3 as in the real image, imported under the tag
# python:3.11-slim (or $1). Needs root, debootstrap, and a docker CLI pointed at a running daemon
# (DOCKER_HOST); scripts/docker-smoke.sh starts one and runs this.
#   CKPTSCOPE_DEBIAN_MIRROR  the Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail
tag="${1:-python:3.11-slim}"
mirror="${CKPTSCOPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
docker="${DOCKER:-docker}"
root=$(mktemp -d /var/tmp/ckptscope-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
log="$root.log"
trap 'rm -rf "$root" "$log"' EXIT
# two stages, so that dpkg in the second runs without an fsync per file (a throwaway tree)
if ! debootstrap --foreign --variant=minbase --include=python3,python3-venv,libpython3.11-dev,ca-certificates \
        bookworm "$root" "$mirror" >"$log" 2>&1 ||
    ! echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/ckptscope-unsafe-io" ||
    ! chroot "$root" /debootstrap/debootstrap --second-stage >>"$log" 2>&1; then
    tail -20 "$log" >&2
    exit 1
fi
rm -f "$root/etc/dpkg/dpkg.cfg.d/ckptscope-unsafe-io"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
# what a slim image does not carry: package caches and lists, docs, man pages
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log
tar -C "$root" --numeric-owner -cf - . |
    "$docker" import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "ckptscope CI stand-in for python:3.11-slim (debootstrap bookworm minbase)" \
        - "$tag" >/dev/null
echo "docker-base: built the stand-in $tag ($("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
