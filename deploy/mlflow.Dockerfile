# The MLflow tracking server for docker-compose.yaml: mlflow (full, the server needs it)
# plus the Postgres driver, which the upstream MLflow image lacks.
ARG MLFLOW_BASE_IMAGE=python:3.11-slim-bookworm
FROM ${MLFLOW_BASE_IMAGE}
# Extra CA certificates for a TLS-intercepting proxy: the ones
# scripts/build-trainer-image.sh collected, when it ran (the glob tolerates none).
COPY constraints.txt trainer_image/certs* /tmp/extra-ca/
RUN find /tmp/extra-ca -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
    && rm -rf /tmp/extra-ca && (update-ca-certificates >/dev/null 2>&1 || true)
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.10" \
    && useradd --uid 1000 --create-home mlflow && mkdir -p /mlartifacts && chown mlflow /mlartifacts
USER mlflow
EXPOSE 5000
