"""loraflow_finetune: check data -> preprocess -> [skip if seen] -> train -> evaluate -> register, teardown always.

Wiring only; what each task does lives in plugins/loraflow (tasks.py, operators.py).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import DAG, task

from loraflow import config, docs, gpus, params, schedule, tasks
from loraflow.evaluate_operator import LoraflowEvaluateOperator
from loraflow.links import MlflowRunLink
from loraflow.operators import LoraflowTrainOperator

form = params.build_params(schedule.param_defaults())

with DAG(
    dag_id="loraflow_finetune",
    description="Fine-tune a HuggingFace causal LM with LoRA/QLoRA and register it in MLflow",
    params=form,
    schedule=schedule.from_env(),
    catchup=False,
    max_active_runs=int(os.environ.get("LORAFLOW_MAX_ACTIVE_RUNS", "4")),
    default_args={"retries": 0, "execution_timeout": timedelta(hours=1)},
    tags=["loraflow", "llm", "lora"],
    doc_md=docs.finetune_doc_md(form),  # for the people who trigger it; the module docstring is for developers
) as dag:

    @task(task_id="prepare")
    def prepare(**context) -> str:
        return tasks.prepare(context)

    @task(task_id="check_data")
    def check_data(ws: str) -> dict:
        return tasks.check_data(ws)

    @task(task_id="preprocess")
    def preprocess(ws: str) -> dict:
        return tasks.preprocess(ws)

    @task.short_circuit(
        task_id="skip_if_registered",
        ignore_downstream_trigger_rules=False,
        retries=3,
        retry_delay=timedelta(seconds=10),
        retry_exponential_backoff=2.0,
    )
    def skip_if_registered(ws: str) -> bool:
        return tasks.should_train(ws)

    @task(
        task_id="register",
        retries=5,
        retry_delay=timedelta(seconds=10),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=10),
    )
    def register(ws: str, train_result: dict | None, **context) -> dict:
        return tasks.register(ws, train_result, context)

    @task(task_id="outcome", trigger_rule="all_done")
    def outcome(**context) -> dict:
        return tasks.outcome(context)

    @task(task_id="teardown", retries=3, retry_delay=timedelta(seconds=10), retry_exponential_backoff=2.0)
    def teardown(ws: str, **context) -> dict:
        return tasks.teardown(ws, context)

    ws = prepare()
    checked = check_data(ws)
    prepped = preprocess(ws)
    gate = skip_if_registered(ws)
    train = LoraflowTrainOperator(
        task_id="train",
        workspace="{{ ti.xcom_pull(task_ids='prepare') }}",
        pool=gpus.pool_name(),  # one slot per GPU: extra runs queue here (loraflow.gpus)
        execution_timeout=timedelta(hours=int(os.environ.get("LORAFLOW_TRAIN_TIMEOUT_HOURS", "24"))),
        retries=config.train_retries(),  # a lost worker's run resumes from its checkpoint on another
        retry_delay=timedelta(seconds=30),
    )
    evaluate = LoraflowEvaluateOperator(  # the new adapter and the champion on this run's eval set
        task_id="evaluate",
        workspace="{{ ti.xcom_pull(task_ids='prepare') }}",
        pool=gpus.pool_name(),
        execution_timeout=timedelta(hours=int(os.environ.get("LORAFLOW_TRAIN_TIMEOUT_HOURS", "24"))),
        retries=config.train_retries(),
        retry_delay=timedelta(seconds=30),
    )
    registered = register(ws, train.output)
    registered.operator.operator_extra_links = (MlflowRunLink(),)
    checked >> prepped >> gate >> train
    train >> evaluate >> registered  # register's gate decides from evaluate's eval.json
    cleanup = teardown(ws).as_teardown(setups=ws)
    registered >> cleanup
    cleanup >> outcome()  # the run's state: failed if any task it needed failed (Airflow reads only leaves)
