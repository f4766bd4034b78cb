"""loraflow_sweep: check data -> preprocess -> trials -> [train -> evaluate] per trial -> register the best, teardown.

Wiring only; what each task does lives in plugins/loraflow (tasks.py, sweep.py, operators.py).
The trials are a mapped task group: one train -> evaluate pair per trial, each on its own
workspace, queued on the GPU pool like any train task.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import DAG, task, task_group
from airflow.task.trigger_rule import TriggerRule

from loraflow import config, docs, gpus, params, sweep, tasks
from loraflow.evaluate_operator import LoraflowEvaluateOperator
from loraflow.links import MlflowRunLink
from loraflow.operators import LoraflowTrainOperator

form = params.build_params(form=params.SWEEP_FORM)
TRAIN_TIMEOUT = timedelta(hours=int(os.environ.get("LORAFLOW_TRAIN_TIMEOUT_HOURS", "24")))

with DAG(
    dag_id=sweep.DAG_ID,
    description="Train several LoRA trials of one fine-tune, register the best in MLflow",
    params=form,
    schedule=None,  # a sweep is a decision a person makes; retraining on a schedule is loraflow_finetune's
    catchup=False,
    max_active_runs=int(os.environ.get("LORAFLOW_MAX_ACTIVE_RUNS", "4")),
    default_args={"retries": 0, "execution_timeout": timedelta(hours=1)},
    tags=["loraflow", "llm", "lora", "sweep"],
    doc_md=docs.sweep_doc_md(form),
) as dag:

    @task(task_id="prepare")
    def prepare(**context) -> str:
        return tasks.prepare_sweep(context)

    @task(task_id="check_data")
    def check_data(ws: str) -> dict:
        return tasks.check_data(ws)

    @task(task_id="preprocess")
    def preprocess(ws: str) -> dict:
        return tasks.preprocess(ws)

    @task(task_id="trials")
    def trials(ws: str) -> list[str]:
        return tasks.sweep_trials(ws)

    @task_group(group_id="trial")
    def trial(workspace: str):
        train = LoraflowTrainOperator(
            task_id="train",
            workspace=workspace,
            pool=gpus.pool_name(),  # one slot per GPU: the trials queue here (loraflow.gpus)
            execution_timeout=TRAIN_TIMEOUT,
            retries=config.train_retries(),
            retry_delay=timedelta(seconds=30),
        )
        evaluate = LoraflowEvaluateOperator(  # this trial's adapter and the champion on the sweep's one eval set
            task_id="evaluate",
            workspace=workspace,
            pool=gpus.pool_name(),
            execution_timeout=TRAIN_TIMEOUT,
            retries=config.train_retries(),
            retry_delay=timedelta(seconds=30),
        )
        train >> evaluate

    @task(
        task_id="register",
        trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,  # the trials that finished still count
        retries=5,
        retry_delay=timedelta(seconds=10),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=10),
    )
    def register(**context) -> dict:
        # prepare's workspace from XCom, not as an argument: a setup's direct downstream must be all_success
        return tasks.register_sweep(context["ti"].xcom_pull(task_ids="prepare"), context)

    @task(task_id="outcome", trigger_rule="all_done")
    def outcome(**context) -> dict:
        return tasks.outcome(context)

    @task(task_id="teardown", retries=3, retry_delay=timedelta(seconds=10), retry_exponential_backoff=2.0)
    def teardown(ws: str, **context) -> dict:
        return tasks.teardown(ws, context)

    ws = prepare()
    prepped = preprocess(ws)
    check_data(ws) >> prepped
    trial_workspaces = trials(ws)
    prepped >> trial_workspaces
    ran = trial.expand(workspace=trial_workspaces)
    registered = register()
    registered.operator.operator_extra_links = (MlflowRunLink(),)
    ran >> registered
    cleanup = teardown(ws).as_teardown(setups=ws)
    registered >> cleanup
    cleanup >> outcome()
