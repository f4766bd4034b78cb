# The MLflow tracking server for docker-compose.yaml: mlflow 3.17.2 (full: the server needs
# it) plus the Postgres driver, which the upstream MLflow image lacks. Context: the
# repository root. Build arguments and context extras as deploy/airflow.Dockerfile:
# BASE_IMAGE (python 3.11; python:3.11-slim-bookworm by default, loraflow-base:bookworm
# without a registry), OFFLINE, PIP_INDEX_URL, deploy/certs/, deploy/wheelhouse/.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG OFFLINE=0
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
USER root
COPY deploy/check-pins.py deploy/certs* /tmp/extra-ca/
RUN set -eu; \
    mkdir -p /usr/local/share/ca-certificates/loraflow; \
    find /tmp/extra-ca -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/loraflow/ \; ; \
    rm -rf /tmp/extra-ca; \
    if command -v update-ca-certificates >/dev/null; then update-ca-certificates >/dev/null 2>&1; fi; \
    python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'; \
    getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /bin/bash mlflow; \
    mkdir -p /mlartifacts && chown 1000 /mlartifacts; \
    python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1
COPY constraints.txt deploy/constraints-stack.txt deploy/check-pins.py /opt/pins/
COPY deploy/wheelhouse* /wheelhouse/
RUN set -eu; \
    set -- --find-links /wheelhouse --only-binary=:all: -c /opt/pins/constraints.txt -c /opt/pins/constraints-stack.txt; \
    if [ "$OFFLINE" = "1" ]; then set -- "$@" --no-index; fi; \
    pip install "$@" "mlflow==3.17.2" "psycopg2-binary==2.9.13"; \
    rm -rf /wheelhouse; \
    pip check; \
    python /opt/pins/check-pins.py /opt/pins/constraints.txt /opt/pins/constraints-stack.txt; \
    python -c 'import psycopg2, mlflow.server; print("mlflow", mlflow.__version__, "psycopg2", psycopg2.__version__)'
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
ARG VERSION=3.17.2
LABEL org.opencontainers.image.title="loraflow-mlflow" \
      org.opencontainers.image.description="MLflow ${VERSION} tracking server with the Postgres driver" \
      org.opencontainers.image.version="${VERSION}"
