#!/usr/bin/env bash
# Builds the local stand-in for the trainer's CUDA base image without any registry:
# debootstrap a minimal Debian bookworm (python 3.11, the ABI of the cp311 CPU torch
# wheel) and `docker import` it as loraflow-base:bookworm.
# Idempotent and fast on a second run: an existing image is kept, and the rootfs
# tarball is cached (LORAFLOW_CACHE, default ~/.cache/loraflow) so an engine that lost
# its images re-imports it in seconds. FORCE=1 rebuilds both. Needs root (debootstrap).
#   LORAFLOW_BASE_IMAGE    image name (default loraflow-base:bookworm)
#   LORAFLOW_DEBIAN_MIRROR apt mirror (default http://deb.debian.org/debian)
set -euo pipefail

IMAGE="${LORAFLOW_BASE_IMAGE:-loraflow-base:bookworm}"
SUITE="${LORAFLOW_BASE_SUITE:-bookworm}"
# Plain HTTP on purpose: apt checks the Release signatures itself, and a TLS-intercepting
# proxy would otherwise need its CA inside a rootfs that has no ca-certificates yet.
MIRROR="${LORAFLOW_DEBIAN_MIRROR:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}"
CACHE="${LORAFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraflow}"
TARBALL="$CACHE/base-$SUITE.tar"
# What the trainer stages need from the base: the interpreter, venv (ensurepip, for the
# builder stage) and the CA store that update-ca-certificates maintains.
PACKAGES="python3,python3-venv,ca-certificates"

if [ "${FORCE:-0}" != "1" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image: $IMAGE already present ($(docker image inspect -f '{{.Id}}' "$IMAGE"))"
  exit 0
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
start=$SECONDS

if [ "${FORCE:-0}" = "1" ] || [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || {
    echo "base image: installing debootstrap"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap
  }
  mkdir -p "$CACHE"
  ROOTFS="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap '$SUDO rm -rf "$ROOTFS"' EXIT
  echo "base image: debootstrap $SUITE from $MIRROR"
  $SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
    echo "loraflow: debootstrap failed; see $CACHE/debootstrap.log (is $MIRROR reachable? set LORAFLOW_DEBIAN_MIRROR)" >&2
    tail -n 20 "$CACHE/debootstrap.log" >&2
    exit 1
  }
  # Slim the rootfs: package lists, docs and caches are rebuilt or unused in images.
  $SUDO rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/usr/share/doc/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/usr/share/locale/*
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
    | $SUDO tee "$ROOTFS/etc/apt/sources.list" >/dev/null
  $SUDO tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  echo "base image: rootfs cached at $TARBALL ($((SECONDS - start)) s)"
fi

docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "loraflow local base: debootstrap $SUITE minbase + $PACKAGES" \
  "$TARBALL" "$IMAGE" >/dev/null
echo "base image: imported $IMAGE in $((SECONDS - start)) s ($(docker image inspect -f '{{.Id}}' "$IMAGE"), $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
