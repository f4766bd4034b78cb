#!/usr/bin/env bash
# Installs the Debian packages loraflow's tests and image build use, when missing.
# Idempotent; needs root (or passwordless sudo) on a Debian/Ubuntu host.
set -euo pipefail

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v chromium >/dev/null || need+=(chromium)
# haproxy runs the compose stack's Docker socket proxy config in the tests.
command -v haproxy >/dev/null || need+=(haproxy)
[ ${#need[@]} -eq 0 ] && { echo "system packages: all present"; exit 0; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "loraflow: installing ${need[*]} needs root; run as root or install them yourself" >&2; exit 1; }
  SUDO="sudo"
fi
echo "system packages: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
# The package starts an idle haproxy service; the tests run their own.
if printf '%s\n' "${need[@]}" | grep -qx haproxy; then $SUDO service haproxy stop >/dev/null 2>&1 || true; fi
