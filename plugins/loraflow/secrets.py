"""Credentials from Airflow connections, never from trigger params or files in the workspace.

- ``LORAFLOW_HF_CONN_ID`` (default ``loraflow_hf``): the password is a Hugging Face hub
  token. It reaches the trainer only as ``HF_TOKEN`` in its environment (the container's,
  ``loraflow.runtimes.docker``, never a rendered field; or the local subprocess's).
- ``LORAFLOW_MLFLOW_CONN_ID`` (default ``loraflow_mlflow``): login and password for an
  MLflow server behind basic auth (or a password alone as a bearer token). They are put in
  the environment of the task process that talks to MLflow (``MLFLOW_TRACKING_USERNAME`` /
  ``_PASSWORD`` / ``_TOKEN``), which MLflow's client reads; the trainer never gets them.

Connections come from wherever Airflow looks: the metadata DB, ``AIRFLOW_CONN_*`` variables
or a secrets backend. Airflow masks a connection's password in task logs once it has been
read. Nothing here is written to job.json, pipeline.json, MLflow params or artifacts.
"""

from __future__ import annotations

import os
from typing import Any

MLFLOW_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def hf_conn_id() -> str:
    return os.environ.get("LORAFLOW_HF_CONN_ID", "loraflow_hf")


def mlflow_conn_id() -> str:
    return os.environ.get("LORAFLOW_MLFLOW_CONN_ID", "loraflow_mlflow")


def _connection(conn_id: str) -> Any | None:
    """The connection, or None when it is not defined (credentials are optional)."""
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # not defined anywhere: no credentials to pass
        if type(exc).__name__ in ("AirflowNotFoundException", "AirflowRuntimeError", "ConnectionNotFound"):
            return None
        raise


def trainer_env() -> dict[str, str]:
    """Secret environment for the trainer: the hub token, if a connection holds one."""
    conn = _connection(hf_conn_id())
    token = conn.password if conn is not None else None
    return {"HF_TOKEN": token} if token else {}


def apply_mlflow_credentials() -> None:
    """Put the MLflow connection's credentials into this process's environment, if defined."""
    conn = _connection(mlflow_conn_id())
    if conn is None:
        return
    if conn.login and conn.password:
        os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password
    elif conn.password:
        os.environ["MLFLOW_TRACKING_TOKEN"] = conn.password
