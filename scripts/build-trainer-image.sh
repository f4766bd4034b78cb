#!/usr/bin/env bash
# Builds the trainer image (trainer_image/Dockerfile, context trainer_image/) on this host
# and prints its id, the digest loraflow records in MLflow.
#
# Prepares the context's git-ignored extras first:
#   trainer_image/wheelhouse/      the CPU torch wheel, hard-linked from LORAFLOW_WHEELS
#                                  (default /opt/wheels): a CPU build never pulls the CUDA
#                                  torch from PyPI;
#   trainer_image/certs/           the host's extra CA certificates (LORAFLOW_EXTRA_CA_DIR,
#                                  default /usr/local/share/ca-certificates), so pip in the
#                                  build trusts a TLS-intercepting proxy;
#   trainer_image/constraints.txt  the repository's pins.
# CPU hosts (LORAFLOW_TORCH=cpu, the default without nvidia-smi) build on the local
# Debian base (scripts/build-base-image.sh, built here when missing); GPU hosts on the
# Dockerfile's CUDA base.
# Idempotent: an image whose loraflow.content label matches the inputs is kept as is,
# and a changed input rebuilds only the layers after it.
#   LORAFLOW_IMAGE (default loraflow-trainer:<version>), LORAFLOW_TORCH (cpu|cuda),
#   LORAFLOW_BASE_IMAGE, LORAFLOW_OFFLINE=1 (wheelhouse only), FORCE=1 (rebuild this image;
#   the base image has its own FORCE: scripts/build-base-image.sh).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
t0=$SECONDS
CTX=trainer_image

VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' $CTX/pyproject.toml | head -n1)"
IMAGE="${LORAFLOW_IMAGE:-loraflow-trainer:$VERSION}"
TORCH_VERSION="$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' $CTX/pyproject.toml | head -n1)"
if [ -z "${LORAFLOW_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then LORAFLOW_TORCH=cuda; else LORAFLOW_TORCH=cpu; fi
fi
WHEELS="${LORAFLOW_WHEELS:-/opt/wheels}"
CA_DIR="${LORAFLOW_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"

build_args=(--build-arg "VERSION=$VERSION")
if [ "$LORAFLOW_TORCH" = "cpu" ]; then
  BASE="${LORAFLOW_BASE_IMAGE:-loraflow-base:bookworm}"
  build_args+=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_REQUIREMENT=torch==${TORCH_VERSION}+cpu")
else
  BASE="${LORAFLOW_BASE_IMAGE:-}"
  [ -n "$BASE" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE")
fi
[ "${LORAFLOW_OFFLINE:-0}" = "1" ] && build_args+=(--build-arg "OFFLINE=1")
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  if [ -n "${!v:-}" ]; then build_args+=(--build-arg "$v=${!v}"); fi
done

COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$COMMIT" != "unknown" ] && [ -n "$(git status --porcelain -- $CTX constraints.txt 2>/dev/null)" ]; then
  COMMIT="$COMMIT-dirty"
fi
# What the image is made of; an image carrying the same hash needs no build.
CONTENT="$( { echo "$LORAFLOW_TORCH ${build_args[*]}"; cat constraints.txt $CTX/Dockerfile $CTX/pyproject.toml;
  find $CTX/loraflow_trainer -name '*.py' -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16)"

if [ "${FORCE:-0}" != "1" ] && \
   [ "$(docker image inspect -f '{{ index .Config.Labels "loraflow.content" }}' "$IMAGE" 2>/dev/null)" = "$CONTENT" ]; then
  echo "trainer image: $IMAGE is up to date (content $CONTENT): $(docker image inspect -f '{{.Id}}' "$IMAGE")"
  exit 0
fi

# ---- base image -----------------------------------------------------------------------
if [ "$BASE" = "loraflow-base:bookworm" ]; then
  FORCE=0 LORAFLOW_BASE_IMAGE="$BASE" bash "$REPO/scripts/build-base-image.sh"
fi
t_base=$SECONDS

# ---- context extras ---------------------------------------------------------------------
# Rewritten on every build; content-identical files keep Docker's layer cache valid.
rm -rf $CTX/certs
mkdir -p $CTX/certs $CTX/wheelhouse
if [ -d "$CA_DIR" ]; then
  find -L "$CA_DIR" -type f -name '*.crt' -exec cp {} $CTX/certs/ \;
  chmod 0644 $CTX/certs/*.crt 2>/dev/null || true
fi
cp constraints.txt $CTX/constraints.txt
if [ "$LORAFLOW_TORCH" = "cpu" ]; then
  pattern="torch-${TORCH_VERSION}+cpu-*.whl"
  if ! compgen -G "$CTX/wheelhouse/$pattern" >/dev/null; then
    for whl in "$WHEELS"/$pattern; do
      [ -f "$whl" ] || continue
      # A hard link costs no space or time; another filesystem needs a copy.
      ln -f "$whl" $CTX/wheelhouse/ 2>/dev/null || cp -f "$whl" $CTX/wheelhouse/
    done
  fi
  compgen -G "$CTX/wheelhouse/$pattern" >/dev/null || {
    echo "loraflow: no CPU torch wheel ($pattern) in $CTX/wheelhouse/ or $WHEELS; put it there (PyPI has only the CUDA build) or build on a GPU host with LORAFLOW_TORCH=cuda." >&2
    exit 1
  }
else
  # torch==X matches a local X+cpu wheel too (and pip prefers it): keep it out of a CUDA build.
  rm -f $CTX/wheelhouse/torch-*+cpu-*.whl
fi
# rouge-score (the evaluate task's ROUGE metrics) is published as an sdist only, and the image
# installs wheels only (--only-binary): take its wheel from LORAFLOW_WHEELS, else build it here.
ROUGE="$(sed -n 's/.*"rouge-score==\([^"]*\)".*/\1/p' $CTX/pyproject.toml | head -n1)"
if [ -n "$ROUGE" ] && ! compgen -G "$CTX/wheelhouse/rouge_score-${ROUGE}-*.whl" >/dev/null; then
  for whl in "$WHEELS"/rouge_score-"${ROUGE}"-*.whl; do [ -f "$whl" ] && cp -f "$whl" $CTX/wheelhouse/; done
  if ! compgen -G "$CTX/wheelhouse/rouge_score-${ROUGE}-*.whl" >/dev/null; then
    PIP_PY="$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )"
    "$PIP_PY" -m pip wheel --quiet --no-deps "rouge-score==$ROUGE" -w $CTX/wheelhouse || {
      echo "loraflow: could not build the rouge-score $ROUGE wheel (PyPI has only its sdist); put rouge_score-$ROUGE-py3-none-any.whl in $WHEELS" >&2
      exit 1
    }
  fi
fi
echo "trainer image: context has $(ls $CTX/certs | wc -l) extra CA cert(s), $(ls $CTX/wheelhouse | wc -l) local wheel(s)"
t_ctx=$SECONDS

# ---- build ----------------------------------------------------------------------------
echo "trainer image: building $IMAGE (torch: $LORAFLOW_TORCH, base: ${BASE:-Dockerfile default}, commit: $COMMIT)"
mkdir -p build
LOG="build/docker-build.log"
# The classic builder unless the caller asks for BuildKit: Debian's docker.io ships no
# buildx plugin, and the Dockerfile needs nothing BuildKit-only.
if ! DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build "${build_args[@]}" \
     --build-arg "GIT_COMMIT=$COMMIT" --label "loraflow.content=$CONTENT" -t "$IMAGE" $CTX >"$LOG" 2>&1; then
  tail -n 40 "$LOG" >&2
  echo "loraflow: the trainer image build failed; the whole log is in $LOG." >&2
  exit 1
fi
t_build=$SECONDS

echo "trainer image: $IMAGE"
echo "  id (the digest loraflow records): $(docker image inspect -f '{{.Id}}' "$IMAGE")"
echo "  size: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'); revision: $COMMIT"
echo "  timings: base $((t_base - t0)) s, context $((t_ctx - t_base)) s, docker build $((t_build - t_ctx)) s"
