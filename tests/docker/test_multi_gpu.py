"""A run asking for two GPUs, end to end on the docker runtime: its train task takes two slots of
the GPU pool, its container gets exactly those two devices, the trainer runs two ranks, and
the registered version carries its devices and cost (``loraflow models show`` prints them).

No GPU driver here: the worker names its GPUs with LORAFLOW_GPU_IDS and hands them to the
container as NVIDIA_VISIBLE_DEVICES (LORAFLOW_GPU_REQUEST=env, runc ignores it), as the
concurrency test does; LORAFLOW_GPUS_ON_CPU=1 tells the trainer each leased GPU is one CPU
process (gloo). The pool policy, the lease, the container, torchrun and the registry are real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.pipeline.conftest import conf

pytestmark = pytest.mark.slow


def _pool_slots(run_id: str) -> int:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalar(select(TaskInstance).where(TaskInstance.run_id == run_id, TaskInstance.task_id == "train"))
        return ti.pool_slots


def test_a_two_gpu_run_takes_two_pool_slots_two_devices_two_ranks_and_records_its_cost(
    run_dag, monkeypatch, docker_client, trainer_image, mlflow_client, mlflow_server
):
    from loraflow.workspace import Pipeline

    monkeypatch.setenv("LORAFLOW_GPU_IDS", "0,1,2")
    monkeypatch.setenv("LORAFLOW_GPU_SLOTS", "3")
    monkeypatch.setenv("LORAFLOW_GPU_REQUEST", "env")
    monkeypatch.setenv("LORAFLOW_GPUS_ON_CPU", "1")
    monkeypatch.setenv("LORAFLOW_GPU_HOUR_COST", "2.5")
    name = "two-gpus"
    t0 = time.time()
    state, tis, ws = run_dag(conf(name, runtime="docker", gpus="1,2", max_steps=4, per_device_train_batch_size=4))
    assert state == "success", tis
    run_id = Pipeline.load(ws).run_id
    assert _pool_slots(run_id) == 2  # the cluster policy sized the train task's slots from the run's gpus

    starts = [
        ev
        for ev in docker_client.events(
            since=int(t0),
            until=int(time.time()) + 1,
            decode=True,
            filters={"type": "container", "event": "start", "label": f"loraflow.run_id={run_id}"},
        )
    ]
    labels = [ev["Actor"]["Attributes"].get("loraflow.gpu") for ev in starts]  # train (and evaluate) containers
    assert labels and set(labels) == {"1,2"}, labels

    events = [json.loads(line) for line in (ws / "output" / "events.jsonl").read_text().splitlines()]
    [launch] = [e for e in events if e["event"] == "launch"]
    assert launch["world_size"] == 2 and launch["strategy"] == "ddp"
    assert launch["devices"] == {"NVIDIA_VISIBLE_DEVICES": "1,2", "LORAFLOW_GPUS": "1,2"}  # exactly the leased two
    metrics = json.loads((ws / "output" / "metrics.json").read_text())
    assert (metrics["device_count"], metrics["effective_batch_size"]) == (2, 8)

    [mv] = mlflow_client.search_model_versions(f"name = '{name}'")
    tags = mv.tags
    assert tags["loraflow.devices"] == "2 x cpu" and tags["loraflow.device_count"] == "2"
    assert float(tags["loraflow.device_seconds"]) == pytest.approx(metrics["device_seconds"], abs=0.05)
    assert float(tags["loraflow.cost"]) == pytest.approx(metrics["device_seconds"] / 3600 * 2.5, rel=1e-3, abs=1e-4)
    assert float(tags["loraflow.tokens_per_second_per_device"]) > 0

    show = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraflow.cli",
            "--tracking-uri",
            mlflow_server,
            "models",
            "show",
            f"{name}/{mv.version}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr[-2000:]
    assert "2 x cpu" in show.stdout and f"cost {tags['loraflow.cost']} USD" in show.stdout
