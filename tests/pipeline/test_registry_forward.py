"""The registry never moves backwards, and never points at bytes it does not hold.

Two real runs of loraflow_finetune (dag.test() on the migrated DB, the tiny model, the
session's MLflow server): an older, worse run A and a newer, better run B. Then tasks of
these finished runs are cleared and re-run the way the UI's Clear does it (Airflow's own
``clear`` on the stored run, then the task run in process as dag.test() runs it).
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import timedelta

import pytest

from tests.pipeline.conftest import conf, load_dag, task_states

pytestmark = pytest.mark.slow

NAME = "forward-only"


def clear_and_rerun(run_id: str, *task_ids: str, downstream: bool = False) -> tuple[str, dict[str, str]]:
    """Clear ``task_ids`` of a finished DAG run (and their downstream tasks when asked, as the
    Clear dialog's "Downstream" does) and run what becomes runnable until the run finishes;
    return (run state, task states)."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    dag = load_dag()
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    cleared = set(task_ids)
    if downstream:
        for task_id in task_ids:
            cleared |= dag.get_task(task_id).get_flat_relative_ids(upstream=False)
    scheduler_dag.clear(task_ids=sorted(cleared), run_id=run_id)
    session = settings.Session()
    dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
    dr.state = DagRunState.RUNNING  # what the scheduler does with the queued run
    session.commit()
    dr.dag = scheduler_dag
    while dr.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        for ti in [t for t in dr.get_task_instances(session=session) if t.state == TaskInstanceState.SCHEDULED]:
            try:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id])
            except Exception:  # recorded as the task's state, as dag.test() does
                pass
    state = str(getattr(dr.state, "value", dr.state))
    session.close()
    return state, task_states(dr)


def _aliases(client) -> dict[str, str]:
    return dict(client.get_registered_model(NAME).aliases)


def _versions(client) -> list[str]:
    return sorted((v.version for v in client.search_model_versions(f"name = '{NAME}'")), key=int)


def _digest(ws) -> str:
    return hashlib.sha256((ws / "output" / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(dag, mlflow_server):
    """Run A (logical date an hour ago, one tiny step: worse) then run B (now, trained: better)."""
    from airflow.sdk import timezone

    from loraflow.workspace import run_dir

    now = timezone.utcnow()
    older = load_dag().test(run_conf=conf(NAME, max_steps=1, learning_rate=1e-5), logical_date=now - timedelta(hours=1))
    newer = load_dag().test(run_conf=conf(NAME), logical_date=now)
    assert older.state == "success" and newer.state == "success", (task_states(older), task_states(newer))
    return {
        "a": older.run_id,
        "b": newer.run_id,
        "ws_a": run_dir(older.dag_id, older.run_id),
        "ws_b": run_dir(newer.dag_id, newer.run_id),
    }


def test_rerun_register_of_an_older_run_leaves_both_aliases_on_the_newer_version(two_runs, mlflow_client):
    before = _aliases(mlflow_client)
    assert before == {"champion": "2", "challenger": "2"}  # B is newer and better

    state, tis = clear_and_rerun(two_runs["a"], "register")
    assert tis["register"] == "success" and state == "success", tis
    assert _versions(mlflow_client) == ["1", "2"]  # nothing registered twice
    assert _aliases(mlflow_client) == before  # neither alias went back to v1
    note = mlflow_client.get_model_version(NAME, "1").tags["loraflow.alias_note"]
    assert "challenger stays on v2" in note and "champion stays on v2" in note and "older" in note, note


def test_clearing_train_of_a_registered_run_is_refused_and_keeps_its_registered_adapter(two_runs, mlflow_client):
    from loraflow import tasks
    from loraflow.workspace import Pipeline

    ws = two_runs["ws_b"]
    adapter_before, aliases_before = _digest(ws), _aliases(mlflow_client)

    _, tis = clear_and_rerun(two_runs["b"], "train", downstream=True)  # the run's own state is issue 11's point 7
    assert tis["train"] == "failed", tis
    assert tis["register"] == "upstream_failed", tis  # nothing re-registered, nothing "already registered"
    assert _digest(ws) == adapter_before  # the workspace still holds the registered bytes
    assert _versions(mlflow_client) == ["1", "2"] and _aliases(mlflow_client) == aliases_before

    # What the train task's log says (the same check, asked directly).
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(
        AirflowFailException, match="already registered as version 2 of forward-only.*trigger a new DAG run"
    ):
        tasks.refuse_retrain_of_registered(Pipeline.load(ws))


def test_register_refuses_a_workspace_whose_outputs_differ_from_its_registered_version(two_runs, mlflow_client):
    """A retrained workspace (valid outputs, other bytes) under a registered run key: refused."""
    from airflow.sdk.exceptions import AirflowFailException

    from loraflow import tasks

    ws_a, ws_b = two_runs["ws_a"], two_runs["ws_b"]
    shutil.rmtree(ws_a / "output")
    shutil.copytree(ws_b / "output", ws_a / "output")  # consistent outputs: checksums match metadata.json

    _, tis = clear_and_rerun(two_runs["a"], "register")
    assert tis["register"] == "failed", tis
    with pytest.raises(
        AirflowFailException, match="is not what version 1 of forward-only holds.*trigger a new DAG run"
    ):
        tasks.register(str(ws_a), None, {"ti": None})
    assert _versions(mlflow_client) == ["1", "2"] and _aliases(mlflow_client) == {"champion": "2", "challenger": "2"}
