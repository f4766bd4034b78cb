#!/usr/bin/env bash
# The MLflow tracking store lives in the same Postgres server as Airflow's metadata, in
# its own database and role. Runs once, on the first start of an empty data volume.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow WITH LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
