"""What the page shows: loraflow DAG runs joined with the MLflow versions they registered.

DAG runs come from Airflow's metadata DB; versions come from MLflow, matched by the
``loraflow.run_key`` tag (``<dag_id>/<run_id>``). A version whose DAG run is no longer in
the DB (DB reset, run deleted) is still listed, so nothing registered goes missing.
MLflow being down degrades the page to runs only, with the reason shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraflow import config, registry
from loraflow.errors import LoraflowError

MAX_RUNS = 100
MAX_CURVES = 50  # MLflow calls per page view: one per version's run


@dataclass
class RunRow:
    dag_id: str
    run_id: str
    state: str | None = None
    run_type: str | None = None
    started: str | None = None
    model_name: str | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"


@dataclass
class Overview:
    tracking_uri: str
    mlflow_ui: str
    rows: list[RunRow]
    mlflow_error: str | None = None


def dag_runs(session, dag_ids: set[str], limit: int = MAX_RUNS) -> list[RunRow]:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    stmt = select(DagRun).where(DagRun.dag_id.in_(sorted(dag_ids))).order_by(DagRun.run_after.desc()).limit(limit)
    rows = []
    for dr in session.scalars(stmt):
        conf = dr.conf or {}
        rows.append(
            RunRow(
                dag_id=dr.dag_id,
                run_id=dr.run_id,
                state=_text(dr.state),
                run_type=_text(dr.run_type),
                started=_when(dr.start_date or dr.run_after),
                model_name=conf.get("registered_model_name") if isinstance(conf, dict) else None,
            )
        )
    return rows


def _when(moment) -> str | None:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else None


def _text(value) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def overview(session, tracking_uri: str | None = None) -> Overview:
    uri = tracking_uri or config.tracking_uri()
    error = None
    try:
        by_key = registry.versions_by_run_key(uri)
    except LoraflowError as exc:
        by_key, error = {}, str(exc)
    dag_ids = {config.DAG_ID} | {v["lineage"]["dag_id"] for vs in by_key.values() for v in vs if v["lineage"]["dag_id"]}
    rows = dag_runs(session, dag_ids)
    seen = set()
    for row in rows:
        row.versions = by_key.get(row.run_key, [])
        seen.add(row.run_key)
    for key, versions in sorted(by_key.items(), key=lambda kv: max(v["created"] or "" for v in kv[1]), reverse=True):
        if key not in seen:
            dag_id, _, run_id = key.partition("/")
            rows.append(RunRow(dag_id=dag_id, run_id=run_id, versions=versions))
    for row in rows:
        if not row.model_name and row.versions:
            row.model_name = row.versions[0]["name"]
    if error is None:
        add_loss_curves(uri, [v for row in rows for v in row.versions])
    return Overview(tracking_uri=uri, mlflow_ui=registry.ui_url(uri), rows=rows, mlflow_error=error)


def add_loss_curves(uri: str, versions: list[dict[str, Any]], limit: int = MAX_CURVES) -> None:
    """Set each version's ``loss_curve`` to its run's train loss per logging step, [[step, loss], ...].

    The points are the MLflow metric history ``register`` logged; a version without one
    (registered before loraflow logged histories, or its run deleted) gets an empty curve.
    """
    from mlflow.exceptions import MlflowException

    mc = registry.mlflow_client(uri)
    runs: dict[str, list[list[float]]] = {}
    for v in versions:
        run_id = v.get("mlflow_run_id")
        if run_id and run_id not in runs and len(runs) < limit:
            try:
                history = mc.get_metric_history(run_id, "loss")
            except (MlflowException, OSError):  # a picture is not worth failing the page over
                history = []
            runs[run_id] = [[m.step, m.value] for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
        v["loss_curve"] = runs.get(run_id, []) if run_id else []


def as_json(ov: Overview) -> dict[str, Any]:
    return {
        "tracking_uri": ov.tracking_uri,
        "mlflow_error": ov.mlflow_error,
        "runs": [
            {
                "dag_id": r.dag_id,
                "run_id": r.run_id,
                "run_key": r.run_key,
                "state": r.state,
                "run_type": r.run_type,
                "started": r.started,
                "model_name": r.model_name,
                "versions": r.versions,
            }
            for r in ov.rows
        ],
    }
