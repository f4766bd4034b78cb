#!/usr/bin/env bash
# Entry point of the loraflow Airflow image (deploy/airflow.Dockerfile).
# Writes SimpleAuthManager's passwords file from the admin password the deployment sets
# (the compose secret /run/secrets/airflow_admin_password, or AIRFLOW_ADMIN_PASSWORD), so
# the password is the operator's and survives re-creating the container: Airflow would
# otherwise invent a new one on every fresh container and print it to the log.
set -euo pipefail
secret="${AIRFLOW_ADMIN_PASSWORD_FILE:-/run/secrets/airflow_admin_password}"
password="${AIRFLOW_ADMIN_PASSWORD:-}"
if [ -z "$password" ] && [ -r "$secret" ]; then password="$(cat "$secret")"; fi
file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}"
if [ -n "$file" ]; then
  if [ -n "$password" ]; then
    users="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
    ADMIN_PASSWORD="$password" USERS="$users" python - "$file" <<'PY'
import json, os, sys
users = [u.split(":")[0] for u in os.environ["USERS"].split(",") if u.strip()]
with open(sys.argv[1], "w", encoding="utf-8") as fh:
    json.dump({u.strip(): os.environ["ADMIN_PASSWORD"] for u in users}, fh)
os.chmod(sys.argv[1], 0o600)
PY
  elif [ "${1:-} ${2:-}" = "airflow api-server" ]; then
    echo "loraflow: no admin password: set AIRFLOW_ADMIN_PASSWORD (docker-compose.yaml passes it as the secret airflow_admin_password)" >&2
    exit 1
  fi
fi
exec "$@"
