"""The cluster policy that makes a train task take one GPU-pool slot per GPU its run asked for.

``pool_slots`` is not a templated field: the scheduler reads it from the task instance row
before the task runs, so neither a Jinja template nor the operator itself can size it from
the run's ``gpus`` param. Airflow's supported seam for "route a task by the run's conf" is
the ``task_instance_mutation_hook`` cluster policy, called by the scheduler when it creates
(and re-creates, for a cleared task) task instances, with the DAG run at hand. loraflow
registers this module under the ``airflow.policy`` entry point (pyproject.toml), so
installing the package installs the policy; nothing goes in airflow_local_settings.py.

The scheduler must see the same ``LORAFLOW_GPU_IDS``/``LORAFLOW_GPU_SLOTS`` as the workers
for ``gpus=all`` (the pool is sized from them too). Runs with an empty conf (scheduled or
asset-triggered) use the DAG's ``gpus`` param default.
"""

from __future__ import annotations

from airflow import settings
from airflow.policies import hookimpl

OPERATOR = "LoraflowTrainOperator"

# Airflow 3.3 marks the hook "not a no-op" only when an airflow_local_settings.py defines
# one; for entry-point policies it stays flagged no-op and DagRun creation bulk-inserts task
# instances without calling it (found by tests/docker/test_multi_gpu.py: 1 slot, not 2).
settings.task_instance_mutation_hook.is_noop = False


@hookimpl
def task_instance_mutation_hook(task_instance, dag_run) -> None:
    if dag_run is None or getattr(task_instance, "operator", None) != OPERATOR:
        return
    from loraflow import gpus

    if task_instance.pool != gpus.pool_name():
        return
    request = str((dag_run.conf or {}).get("gpus") or _default(task_instance) or "auto")
    try:
        task_instance.pool_slots = gpus.slots_for(request)
    except Exception:  # a malformed request is refused by prepare, with its message; never crash the scheduler
        task_instance.pool_slots = 1


def _default(task_instance) -> str | None:
    task = getattr(task_instance, "task", None)
    params = getattr(getattr(task, "dag", None), "params", None)
    try:
        return params.get_param("gpus").value if params is not None else None
    except Exception:  # no such param (another DAG using the operator): one slot
        return None
