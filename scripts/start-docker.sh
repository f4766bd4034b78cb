#!/usr/bin/env bash
# Makes sure a Docker engine answers on this host: installs the Debian `docker.io`
# package when dockerd is missing, starts dockerd in the background when no daemon
# answers, and waits for `docker info`. Idempotent: a running engine is left alone.
# Needs root (or passwordless sudo) only for the install and the daemon start.
set -euo pipefail

LOG="${LORAFLOW_DOCKERD_LOG:-/var/log/loraflow-dockerd.log}"
WAIT_S="${LORAFLOW_DOCKERD_WAIT_S:-60}"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

if docker info >/dev/null 2>&1; then
  echo "docker: engine already running ($(docker version --format '{{.Server.Version}}'))"
  exit 0
fi

if ! command -v dockerd >/dev/null; then
  echo "docker: installing docker.io (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends docker.io
fi

# A booted systemd host manages the daemon itself; elsewhere (CI containers, VMs
# without an init system) we run dockerd directly.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  $SUDO systemctl start docker || true
fi

if ! docker info >/dev/null 2>&1; then
  if ! pgrep -x dockerd >/dev/null; then
    # A socket or pid file left behind by a dead daemon makes the new one refuse to start.
    $SUDO rm -f /var/run/docker.sock /var/run/docker.pid
    echo "docker: starting dockerd (log: $LOG)"
    # setsid: the daemon outlives this script and the shell that ran it.
    $SUDO setsid dockerd >"$LOG" 2>&1 </dev/null &
  fi
fi

for _ in $(seq 1 "$WAIT_S"); do
  if docker info >/dev/null 2>&1; then
    echo "docker: engine ready ($(docker version --format '{{.Server.Version}}'))"
    exit 0
  fi
  sleep 1
done

echo "loraflow: the Docker engine did not answer within ${WAIT_S}s; see $LOG for why dockerd failed to start." >&2
tail -n 20 "$LOG" >&2 2>/dev/null || true
exit 1
