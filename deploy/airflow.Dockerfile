# Airflow 3.3 with the loraflow plugin (plugins/loraflow) and its pinned dependencies.
# Built by docker-compose.yaml (service airflow-init); context: the repository root.
# The Airflow side never needs torch: only the job spec part of loraflow_trainer.
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_BASE_IMAGE}
USER root
# Extra CA certificates for a TLS-intercepting proxy: the ones
# scripts/build-trainer-image.sh collected, when it ran (the glob tolerates none).
COPY constraints.txt trainer_image/certs* /tmp/extra-ca/
RUN find /tmp/extra-ca -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
    && rm -rf /tmp/extra-ca && update-ca-certificates >/dev/null
USER airflow
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
COPY --chown=airflow:0 constraints.txt pyproject.toml /opt/loraflow/
COPY --chown=airflow:0 trainer_image/pyproject.toml /opt/loraflow/trainer_image/pyproject.toml
COPY --chown=airflow:0 trainer_image/loraflow_trainer /opt/loraflow/trainer_image/loraflow_trainer
COPY --chown=airflow:0 plugins /opt/loraflow/plugins
# apache-airflow pinned in the same command so pip never swaps the image's Airflow.
RUN pip install --no-cache-dir -c /opt/loraflow/constraints.txt "apache-airflow==3.3.2" \
        /opt/loraflow/trainer_image /opt/loraflow
COPY --chown=airflow:0 examples /opt/loraflow/examples
COPY --chown=airflow:0 dags /opt/airflow/dags
