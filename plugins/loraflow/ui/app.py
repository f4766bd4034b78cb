"""The loraflow FastAPI app the Airflow api-server mounts at ``/loraflow``.

Plugin apps get no authentication from Airflow by default, so every route depends on
Airflow's own check: a signed-in user allowed to read DAG runs (the JWT from the
``Authorization: Bearer`` header or the UI's ``_token`` cookie). Routes are sync
functions: MLflow's client blocks, and FastAPI runs sync routes in its thread pool.

The one write, ``POST /api/models/{name}/versions/{version}/aliases/{alias}`` (move an
alias, as ``loraflow models promote`` does), needs more: permission to edit DAG runs
(Airflow's ``PUT`` on DAG runs; in the simple auth manager the roles user, op and admin,
not viewer), and the JWT in the ``Authorization`` header. A request authenticated only by
the cookie is refused: the browser attaches cookies to cross-site requests, a header it
does not, so a bearer-only write cannot be forged from another site (CSRF).
"""

from __future__ import annotations

import re

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from loraflow import config, registry
from loraflow.errors import LoraflowError, RegistryError, RegistryUnavailable
from loraflow.ui import data, page

URL_PREFIX = "/loraflow"

# The page must answer quickly even when MLflow is down: no retries, short timeouts.
registry.http_defaults(interactive=True)

app = FastAPI(
    title="loraflow",
    description="loraflow runs and the MLflow model versions they registered",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))],
    # FastAPI's own docs routes skip app dependencies: no anonymous /docs; the schema is served below, signed in.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
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


@app.get("/openapi.json", include_in_schema=False)
def openapi_schema() -> dict:
    return app.openapi()


@app.get("/mlflow-run", response_model=None)
def mlflow_run(dag_id: str = Query(...), run_id: str = Query(...)) -> RedirectResponse | HTMLResponse:
    """Where the "MLflow run" extra link points: resolved at click time, so it works before register ran."""
    uri = config.tracking_uri()
    try:
        found = registry.mlflow_run_for(uri, f"{dag_id}/{run_id}")
    except LoraflowError as exc:
        return HTMLResponse(_message(str(exc)), status_code=503)
    if found is None:
        return HTMLResponse(
            _message(
                f"DAG run {dag_id}/{run_id} has not logged to MLflow yet (the register task creates "
                "the MLflow run); try again after it has run"
            ),
            status_code=404,
        )
    return RedirectResponse(found["url"], status_code=307)


# The report is loraflow's own HTML (gate.report_html) read back from the artifact store, which others may write
# to: served with no scripts, no requests out and in a sandbox, so it can never act as the Airflow origin.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


@app.get("/gate-report", response_class=HTMLResponse)
def gate_report(name: str = Query(...), version: str = Query(...)) -> HTMLResponse:
    """A version's gate report (``gate.REPORT_ARTIFACT`` in its MLflow run), as the page links it."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from loraflow import gate

    if not re.fullmatch(r"[1-9][0-9]*", version):
        return HTMLResponse(_message(f"version {version!r} is not a version number; use e.g. 1"), status_code=400)
    uri = config.tracking_uri()
    mc = registry.mlflow_client(uri)
    try:
        with registry.reachable(uri, interactive=True), tempfile.TemporaryDirectory() as tmp:
            mv = mc.get_model_version(name, version)
            text = Path(mc.download_artifacts(mv.run_id, gate.REPORT_ARTIFACT, tmp)).read_text()
    except LoraflowError as exc:
        return HTMLResponse(_message(str(exc)), status_code=503)
    except (MlflowException, OSError):
        return HTMLResponse(
            _message(
                f"{name} v{version} has no gate report in MLflow ({gate.REPORT_ARTIFACT} of its run): it was "
                "registered without an evaluate task, or it does not exist"
            ),
            status_code=404,
        )
    return HTMLResponse(text, headers={"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"})


_bearer = HTTPBearer(
    auto_error=False, description="the JWT from POST /auth/token; the _token cookie is not accepted for writes"
)


def bearer_only(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Refuse a write authenticated only by the cookie (CSRF): the JWT must come in the header."""
    if credentials is None:
        raise HTTPException(
            status_code=403,
            detail=(
                "this endpoint changes the registry, so it accepts only a bearer token: send the JWT from "
                "POST /auth/token in the 'Authorization: Bearer <token>' header; the _token cookie alone is refused "
                "(cross-site request forgery protection)"
            ),
        )


class Promotion(BaseModel):
    reason: str = Field(
        min_length=1, max_length=5000, description="why this version; stored as loraflow.promotion_reason"
    )


@app.post(
    "/api/models/{name}/versions/{version}/aliases/{alias}",
    dependencies=[Depends(requires_access_dag("PUT", DagAccessEntity.RUN)), Depends(bearer_only)],
)
def promote_version(name: str, version: str, alias: str, body: Promotion, user: GetUserDep) -> dict:
    """Point ``alias`` at version ``version`` of ``name`` and record who (the Airflow user) and why.

    Returns ``{name, version, alias, previous_version, promoted_by, reason}``; ``previous_version``
    is the version the alias pointed at before (null if it was new).
    """
    if not re.fullmatch(r"[1-9][0-9]*", version):
        raise HTTPException(status_code=400, detail=f"version {version!r} is not a version number; use e.g. 1")
    if not body.reason.strip():
        raise HTTPException(status_code=400, detail='a promotion needs a reason; send {"reason": "why this version"}')
    from mlflow.exceptions import MlflowException

    uri = config.tracking_uri()
    who = user.get_name()
    try:
        done = registry.promote(uri, name, version, alias, body.reason, by=who)
    except registry.NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except RegistryUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from None
    except LoraflowError as exc:  # an alias loraflow does not accept
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except MlflowException as exc:  # e.g. an alias MLflow reserves (v1, v2, ...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        code = 400 if exc.error_code == "INVALID_PARAMETER_VALUE" else 502
        raise HTTPException(
            status_code=code, detail=f"MLflow at {uri} refused to set alias {alias!r}: {first}"
        ) from None
    return {
        "name": done["name"],
        "version": done["version"],
        "alias": done["alias"],
        "previous_version": done["previous_version"],
        "promoted_by": who,
        "reason": done["promotion_reason"],
    }


def _message(text: str) -> str:
    from html import escape

    return f'<!doctype html><html><body style="font-family:sans-serif"><p>{escape(text)}</p></body></html>'
