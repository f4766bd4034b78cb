"""What the page shows: loraflow DAG runs joined with the MLflow versions they registered.

DAG runs come from Airflow's metadata DB; versions come from MLflow, matched by their
lineage tags ``loraflow.dag_id`` and ``loraflow.run_id`` (a sweep's trials have run keys of
their own, ``<dag_id>/<run_id>/trial-<n>``, and land on their sweep's row). A version whose
DAG run is no longer in the DB (DB reset, run deleted) is still listed, so nothing
registered goes missing. A sweep's row carries its table, read from the parent MLflow run.
MLflow being down degrades the page to runs only, with the reason shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraflow import config, gate, registry, sweep
from loraflow.errors import LoraflowError

MAX_RUNS = 100
MAX_CURVES = 50  # MLflow calls per page view: one per version's run
MAX_SWEEPS = 20  # MLflow calls per page view: two per sweep run (find its parent run, read its table)


@dataclass
class RunRow:
    dag_id: str
    run_id: str
    state: str | None = None
    run_type: str | None = None
    started: str | None = None
    model_name: str | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)
    sweep: dict[str, Any] | None = None  # a sweep's table (loraflow.sweep.table), from its parent MLflow run

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
        by_key = _by_dag_run(registry.versions_by_run_key(uri))
    except LoraflowError as exc:
        by_key, error = {}, str(exc)
    dag_ids = {config.DAG_ID, sweep.DAG_ID} | {
        v["lineage"]["dag_id"] for vs in by_key.values() for v in vs if v["lineage"]["dag_id"]
    }
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
    for v in (v for row in rows for v in row.versions):
        v["gate_report"] = bool((v.get("tags") or {}).get(gate.TAG_DECISION))  # register logged a report
    if error is None:
        add_loss_curves(uri, [v for row in rows for v in row.versions])
        add_sweep_tables(uri, [row for row in rows if row.dag_id == sweep.DAG_ID])
    return Overview(tracking_uri=uri, mlflow_ui=registry.ui_url(uri), rows=rows, mlflow_error=error)


def _by_dag_run(by_key: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Versions grouped by the DAG run that registered them (a sweep's trials under their sweep), by version."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, versions in by_key.items():
        for v in versions:
            lin = v["lineage"]
            run = f"{lin['dag_id']}/{lin['run_id']}" if lin.get("dag_id") and lin.get("run_id") else key
            out.setdefault(run, []).append(v)
    for versions in out.values():
        versions.sort(key=lambda v: int(v["version"]) if str(v["version"]).isdigit() else 0)
    return out


def add_sweep_tables(uri: str, rows: list[RunRow], limit: int = MAX_SWEEPS) -> None:
    """Set each sweep row's ``sweep`` to the table its register task logged in the parent MLflow run."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    mc = registry.mlflow_client(uri)
    for row in rows[:limit]:
        try:
            parent = registry.mlflow_run_for(uri, row.run_key)
            if parent is None:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = mc.download_artifacts(parent["run_id"], sweep.TABLE_ARTIFACT, tmp)
                row.sweep = {**json.loads(open(path).read()), "parent_run_url": parent["url"]}
        except (LoraflowError, MlflowException, OSError, ValueError):  # not logged yet: the row shows no table
            continue


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
                "sweep": r.sweep,
            }
            for r in ov.rows
        ],
    }
