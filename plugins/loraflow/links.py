"""The "MLflow run" operator extra link for the train and register tasks.

Airflow 3 computes extra links in the worker when a task finishes and stores the URL as
an XCom. The train task finishes before register creates the MLflow run, so the link
points at the loraflow page's ``/mlflow-run`` route, which finds the run by its
``loraflow.run_key`` tag when clicked and redirects to it. No MLflow call at link time.
"""

from __future__ import annotations

from urllib.parse import urlencode

from airflow.sdk import BaseOperatorLink

URL_PREFIX = "/loraflow"


def _airflow_base_url() -> str:
    """Airflow's public base URL path ('' at the host root), from [api] base_url."""
    from urllib.parse import urlparse

    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # no core config in this process (task SDK only): host root
        base = ""
    return urlparse(base).path.rstrip("/")


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        query = urlencode({"dag_id": ti_key.dag_id, "run_id": ti_key.run_id})
        return f"{_airflow_base_url()}{URL_PREFIX}/mlflow-run?{query}"
