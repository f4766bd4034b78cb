"""The loraflow FastAPI app the Airflow api-server mounts at ``/loraflow``.

Plugin apps get no authentication from Airflow by default, so every route depends on
Airflow's own check: a signed-in user allowed to read DAG runs (the JWT from the
``Authorization: Bearer`` header or the UI's ``_token`` cookie). Routes are sync
functions: MLflow's client blocks, and FastAPI runs sync routes in its thread pool.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag

from loraflow import config, lookup
from loraflow.errors import LoraflowError
from loraflow.ui import data, page

URL_PREFIX = "/loraflow"

# The page must answer quickly even when MLflow is down: no retries, short timeouts.
lookup.cli_http_defaults()

app = FastAPI(
    title="loraflow",
    description="loraflow runs and the MLflow model versions they registered",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))],
)


def _airflow_root(request: Request) -> str:
    """Airflow's own root as the browser sees it (the mount point minus our prefix)."""
    return request.scope.get("root_path", "").removesuffix(URL_PREFIX)


@app.get("/", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep) -> HTMLResponse:
    return HTMLResponse(page.render(data.overview(session), _airflow_root(request)))


@app.get("/api/runs")
def runs_json(session: SessionDep) -> dict:
    return data.as_json(data.overview(session))


@app.get("/mlflow-run", response_model=None)
def mlflow_run(dag_id: str = Query(...), run_id: str = Query(...)) -> RedirectResponse | HTMLResponse:
    """Where the "MLflow run" extra link points: resolved at click time, so it works before register ran."""
    uri = config.tracking_uri()
    try:
        found = lookup.mlflow_run_for(uri, f"{dag_id}/{run_id}")
    except LoraflowError as exc:
        return HTMLResponse(_message(str(exc)), status_code=503)
    if found is None:
        return HTMLResponse(_message(f"DAG run {dag_id}/{run_id} has not logged to MLflow yet (the register task creates "
                                     "the MLflow run); try again after it has run"), status_code=404)
    return RedirectResponse(found["url"], status_code=307)


def _message(text: str) -> str:
    from html import escape

    return f"<!doctype html><html><body style=\"font-family:sans-serif\"><p>{escape(text)}</p></body></html>"
