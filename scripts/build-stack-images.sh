#!/usr/bin/env bash
# Builds every image of docker-compose.yaml on this host, without any registry:
#   loraflow-airflow:<version>   Airflow 3.3.2 + celery/postgres extras + the plugin
#   loraflow-mlflow:3.17.2       MLflow server + Postgres driver
#   loraflow-postgres:15, loraflow-redis:7, loraflow-haproxy:2.6   from Debian packages
#   loraflow-trainer:<version>   (scripts/build-trainer-image.sh)
# all on the local base (scripts/build-base-image.sh, built when missing), and writes
# build/stack-images.env: the LORAFLOW_*_IMAGE overrides that make compose use them
#   docker compose --env-file .env --env-file build/stack-images.env up -d
# Same inputs as the trainer image: the host's extra CA certificates (LORAFLOW_EXTRA_CA_DIR,
# copied to deploy/certs/ on EVERY run, whatever else is up to date), an offline wheelhouse
# (LORAFLOW_STACK_WHEELS, hard-linked into deploy/wheelhouse/; LORAFLOW_OFFLINE=1 installs
# from it alone), PIP_INDEX_URL / proxies passed through as build args.
# Idempotent: an image whose loraflow.content label matches its inputs is kept.
#   LORAFLOW_BASE_IMAGE (default loraflow-base:bookworm), FORCE=1 (rebuild these images),
#   LORAFLOW_SKIP_TRAINER=1 (leave the trainer image alone), LORAFLOW_STACK_ONLY="airflow mlflow"
#   (build only the images so named, e.g. after editing the plugin).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
t0=$SECONDS
VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)"
BASE="${LORAFLOW_BASE_IMAGE:-loraflow-base:bookworm}"
CA_DIR="${LORAFLOW_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
mkdir -p build
ENV_FILE=build/stack-images.env
TIMES=build/stack-images.times

if [ "$BASE" = "loraflow-base:bookworm" ]; then
  FORCE=0 LORAFLOW_BASE_IMAGE="$BASE" bash scripts/build-base-image.sh
fi

# ---- context extras (git-ignored) -------------------------------------------------------
rm -rf deploy/certs
mkdir -p deploy/certs deploy/wheelhouse
if [ -d "$CA_DIR" ]; then
  find -L "$CA_DIR" -type f -name '*.crt' -exec cp {} deploy/certs/ \;
  chmod 0644 deploy/certs/*.crt 2>/dev/null || true
fi
if [ -n "${LORAFLOW_STACK_WHEELS:-}" ]; then
  for whl in "$LORAFLOW_STACK_WHEELS"/*.whl; do
    [ -f "$whl" ] || continue
    ln -f "$whl" deploy/wheelhouse/ 2>/dev/null || cp -f "$whl" deploy/wheelhouse/
  done
fi
echo "stack images: context has $(ls deploy/certs | wc -l) extra CA cert(s), $(ls deploy/wheelhouse | wc -l) local wheel(s)"

common_args=(--build-arg "BASE_IMAGE=$BASE")
[ "${LORAFLOW_OFFLINE:-0}" = "1" ] && common_args+=(--build-arg "OFFLINE=1")
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  if [ -n "${!v:-}" ]; then common_args+=(--build-arg "$v=${!v}"); fi
done
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
: >"$TIMES"

# build IMAGE DOCKERFILE INPUT...: docker build from the repository root unless the
# inputs (files, build args, base image id) hash to the label the image already carries.
build() {
  local image="$1" dockerfile="$2"; shift 2
  local content start=$SECONDS log name="${image%%:*}"
  if [ -n "${LORAFLOW_STACK_ONLY:-}" ] && [[ " $LORAFLOW_STACK_ONLY " != *" ${name#loraflow-} "* ]]; then
    return 0
  fi
  content="$( { echo "${common_args[*]} $(docker image inspect -f '{{.Id}}' "$BASE" 2>/dev/null)";
    cat "$dockerfile"; find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null | sort -z | xargs -0 -r cat; } | sha256sum | cut -c1-16)"
  if [ "${FORCE:-0}" != "1" ] && \
     [ "$(docker image inspect -f '{{ index .Config.Labels "loraflow.content" }}' "$image" 2>/dev/null)" = "$content" ]; then
    echo "stack images: $image is up to date (content $content)"
    echo "$image 0 (up to date)" >>"$TIMES"
    return 0
  fi
  log="build/docker-build-$(echo "$image" | tr ':/' '--').log"
  echo "stack images: building $image ($dockerfile on $BASE)"
  if ! DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --force-rm "${common_args[@]}" --build-arg "GIT_COMMIT=$COMMIT" \
       --label "loraflow.content=$content" -f "$dockerfile" -t "$image" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "loraflow: building $image failed; the whole log is in $log." >&2
    exit 1
  fi
  echo "stack images: $image built in $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
  echo "$image $((SECONDS - start))" >>"$TIMES"
}

PY_INPUTS=(constraints.txt deploy/constraints-stack.txt deploy/check-pins.py deploy/certs deploy/wheelhouse)
build "loraflow-postgres:15" deploy/postgres.Dockerfile deploy/postgres
build "loraflow-redis:7" deploy/redis.Dockerfile
build "loraflow-haproxy:2.6" deploy/haproxy.Dockerfile
build "loraflow-mlflow:3.17.2" deploy/mlflow.Dockerfile "${PY_INPUTS[@]}"
build "loraflow-airflow:$VERSION" deploy/airflow.Dockerfile "${PY_INPUTS[@]}" deploy/airflow-entrypoint.sh pyproject.toml plugins dags examples \
  trainer_image/pyproject.toml trainer_image/loraflow_trainer

if [ "${LORAFLOW_SKIP_TRAINER:-0}" != "1" ]; then
  LORAFLOW_BASE_IMAGE="$BASE" bash scripts/build-trainer-image.sh
fi
TRAINER="${LORAFLOW_IMAGE:-loraflow-trainer:$(sed -n 's/^version *= *"\(.*\)"/\1/p' trainer_image/pyproject.toml | head -n1)}"

cat >"$ENV_FILE" <<EOF
# Written by scripts/build-stack-images.sh: docker-compose.yaml on the locally built images.
LORAFLOW_POSTGRES_IMAGE=loraflow-postgres:15
LORAFLOW_REDIS_IMAGE=loraflow-redis:7
LORAFLOW_SOCKET_PROXY_IMAGE=loraflow-haproxy:2.6
LORAFLOW_MLFLOW_IMAGE=loraflow-mlflow:3.17.2
LORAFLOW_AIRFLOW_IMAGE=loraflow-airflow:$VERSION
LORAFLOW_IMAGE=$TRAINER
LORAFLOW_STACK_BASE_IMAGE=$BASE
EOF
echo "stack images: all built in $((SECONDS - t0)) s; compose overrides in $ENV_FILE"
