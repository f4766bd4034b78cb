"""Running loraflow_finetune for real: dag.test() on the migrated DB against the MLflow server."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, REPO, SAMPLE_CHAT


def load_dag(dag_id: str = "loraflow_finetune"):
    """The DAG as the dag processor parses it: a fresh object for every run.

    dag.test() runs tasks in this process, and Airflow merges each run's conf into the
    DAG's own Param objects while it validates them: reusing one DAG object would carry
    one run's settings into the next (a worker process never sees a second run).
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


@pytest.fixture(scope="session")
def dag(airflow_db, mlflow_server, tiny_model):
    return load_dag()


@pytest.fixture
def run_dag(dag):
    """Run one DAG run; return (state, {task_id: state}, workspace or None)."""

    def _run(conf: dict, **kwargs):
        dr = load_dag().test(run_conf=conf, **kwargs)
        return dr.state, task_states(dr), workspace_of(dr)

    return _run


def try_numbers(dr_or_run_id: str) -> dict[str, int]:
    """How many times each task of a DAG run was tried."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == dr_or_run_id)).all()
        return {ti.task_id: ti.try_number for ti in tis}


def task_states(dr) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dr.dag_id, TaskInstance.run_id == dr.run_id)
        ).all()
        return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}


def workspace_of(dr):
    from loraflow.workspace import run_dir

    return run_dir(dr.dag_id, dr.run_id)


def conf(name: str, **overrides) -> dict:
    return {
        "dataset_path": str(SAMPLE_CHAT),
        "data_format": "chat",
        "registered_model_name": name,
        "runtime": "local",
        **FAST,
        **overrides,
    }


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
