# Airflow 3.3.2 (celery + postgres extras) with the loraflow plugin, for docker-compose.yaml.
# Context: the repository root (.dockerignore lets in only what this needs).
#   scripts/build-stack-images.sh   builds it (and the rest of the stack) on the local base
#   docker compose build airflow-init   the same, on the default base from a registry
#
# Build arguments (the trainer image's, same meaning):
#   BASE_IMAGE     any Debian/Ubuntu image with python 3.11 (python3 -m venv works):
#                  python:3.11-slim-bookworm by default, loraflow-base:bookworm without a
#                  registry (scripts/build-base-image.sh)
#   OFFLINE        1: install from deploy/wheelhouse/ only (--no-index), for air-gapped hosts
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL  a private index or mirror
# Context extras, git-ignored, filled by scripts/build-stack-images.sh and optional:
#   deploy/certs/*.crt   extra CA certificates (TLS-intercepting proxy)
#   deploy/wheelhouse/   wheels searched before the index
#
# One Python set, wherever it is built: constraints.txt plus deploy/constraints-stack.txt,
# and the build fails when pip installed anything that neither file pins
# (deploy/check-pins.py), or when the executor the stack runs does not import.
# Works with the classic builder (Debian's docker.io): no heredocs, no cache mounts.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG OFFLINE=0
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
USER root
# The glob tolerates an empty certs/ (COPY fails only when no source matches).
COPY deploy/check-pins.py deploy/certs* /tmp/extra-ca/
RUN set -eu; \
    mkdir -p /usr/local/share/ca-certificates/loraflow; \
    find /tmp/extra-ca -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/loraflow/ \; ; \
    rm -rf /tmp/extra-ca; \
    if command -v update-ca-certificates >/dev/null; then update-ca-certificates >/dev/null 2>&1; fi; \
    python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'; \
    getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 0 --home-dir /opt/airflow --no-create-home --shell /bin/bash airflow; \
    mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/loraflow; \
    python3 -m venv /opt/venv
# pip trusts certifi's bundle, not the system store: point it at the store with the proxy's CA.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_ROOT_USER_ACTION=ignore
COPY constraints.txt pyproject.toml /opt/loraflow/
COPY deploy/constraints-stack.txt deploy/check-pins.py /opt/loraflow/deploy/
COPY deploy/wheelhouse* /wheelhouse/
COPY trainer_image/pyproject.toml /opt/loraflow/trainer_image/pyproject.toml
# Layer 1, the dependencies: Airflow with its extras and what the two pyproject files
# declare (read with tomllib), binary wheels only (no compiler here). It depends on the
# pins and the pyproject files alone, so a change to the plugin's sources rebuilds only
# the small layer below.
RUN set -eu; \
    set -- --find-links /wheelhouse -c /opt/loraflow/constraints.txt -c /opt/loraflow/deploy/constraints-stack.txt; \
    if [ "$OFFLINE" = "1" ]; then set -- "$@" --no-index; fi; \
    deps="$(python -c 'import tomllib; print(" ".join(d for f in ("/opt/loraflow/pyproject.toml", "/opt/loraflow/trainer_image/pyproject.toml") for d in tomllib.load(open(f, "rb"))["project"]["dependencies"] if not d.startswith("loraflow")))')"; \
    pip install "$@" --only-binary=:all: "setuptools==80.9.0"; \
    pip install "$@" --only-binary=:all: "apache-airflow[celery,postgres]==3.3.2" $deps; \
    rm -rf /wheelhouse
COPY trainer_image/loraflow_trainer /opt/loraflow/trainer_image/loraflow_trainer
COPY plugins /opt/loraflow/plugins
COPY examples /opt/loraflow/examples
# Layer 2, the two local projects, without isolation from the pinned setuptools and
# without dependencies (layer 1 has them; pip check proves it), so OFFLINE needs nothing
# beyond the wheelhouse. Then the whole set is checked against the pins.
RUN set -eu; \
    pip install --no-deps --no-build-isolation /opt/loraflow/trainer_image /opt/loraflow; \
    rm -rf /opt/loraflow/build /opt/loraflow/trainer_image/build /opt/loraflow/*.egg-info /opt/loraflow/trainer_image/*.egg-info; \
    pip check; \
    python /opt/loraflow/deploy/check-pins.py /opt/loraflow/constraints.txt /opt/loraflow/deploy/constraints-stack.txt; \
    python -c 'from airflow.providers.celery.executors.celery_executor import CeleryExecutor; from airflow.providers.celery.executors.celery_executor_utils import app; print("CeleryExecutor imports; celery app", app.main)'
COPY dags /opt/airflow/dags
COPY deploy/airflow-entrypoint.sh /usr/local/bin/loraflow-airflow-entrypoint
RUN chown -R 1000:0 /opt/airflow && chmod -R g+rwX /opt/airflow
# The installed package finds its examples by itself (share/loraflow/examples in the venv);
# LORAFLOW_EXAMPLES names the copy beside the plugin sources explicitly, for every process.
ENV AIRFLOW_HOME=/opt/airflow \
    LORAFLOW_EXAMPLES=/opt/loraflow/examples \
    PYTHONUNBUFFERED=1
USER 1000:0
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["bash", "/usr/local/bin/loraflow-airflow-entrypoint"]
CMD ["airflow", "version"]
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
# No .git in the image: registered versions record the commit the image was built from.
ENV LORAFLOW_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="loraflow-airflow" \
      org.opencontainers.image.description="Airflow 3.3.2 (CeleryExecutor, Postgres) with the loraflow plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
