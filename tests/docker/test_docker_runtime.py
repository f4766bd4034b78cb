"""loraflow_finetune with runtime=docker against the real engine: the DockerOperator starts
the trainer image, trains the tiny model, and registration records the image digest; and
when the container fails, runs out of memory, is killed, or asks for a GPU that is not
there, the task says why, no container of the run is left, earlier outputs are intact and
the MLflow run is FAILED."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.docker.conftest import containers_of
from tests.pipeline.conftest import conf

pytestmark = pytest.mark.slow


def docker_conf(name: str, **overrides) -> dict:
    return conf(name, runtime="docker", gpus="none", **overrides)


def run_id_of(ws: Path) -> str:
    from loraflow.workspace import Pipeline

    return Pipeline.load(ws).run_id


def mlflow_run_of(client, name: str, ws: Path):
    from loraflow.workspace import Pipeline

    key = Pipeline.load(ws).run_key
    exp = client.get_experiment_by_name(f"loraflow/{name}")
    assert exp is not None, f"no MLflow experiment for {name}"
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`loraflow.run_key` = '{key}'")
    return run


def train_error(ws: Path) -> str:
    """Run the train task's operator again on this workspace; the TrainingError it raises."""
    from loraflow.errors import TrainingError
    from loraflow.operators import LoraflowTrainOperator

    op = LoraflowTrainOperator(task_id="train", workspace=str(ws))
    with pytest.raises(TrainingError) as err:
        op.execute({})
    return str(err.value)


def assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws):
    assert state == "failed", tis
    assert tis["train"] == "failed" and tis["register"] == "upstream_failed" and tis["teardown"] == "success", tis
    assert containers_of(docker_client, run_id_of(ws)) == []
    # What earlier tasks wrote is still there for a look (and a retry).
    for done in ("job.json", "data_report.json", "data/train.parquet", "data/eval.parquet", "fingerprint.json"):
        assert (ws / done).is_file(), done
    assert not (ws / "output" / "_SUCCESS").exists()
    assert mlflow_run_of(mlflow_client, name, ws).info.status == "FAILED"


def test_docker_runtime_trains_in_the_container_and_registers_the_image_digest(
        run_dag, mlflow_client, docker_client, trainer_image):
    name = "docker-e2e"
    state, tis, ws = run_dag(docker_conf(name))
    assert state == "success", tis
    [version] = mlflow_client.search_model_versions(f"name = '{name}'")
    image = docker_client.images.get(trainer_image)
    assert version.tags["loraflow.runtime"] == "docker"
    assert version.tags["loraflow.image"] == trainer_image
    assert version.tags["loraflow.image_digest"] == image.id
    assert mlflow_client.get_run(version.run_id).info.status == "FINISHED"
    assert (ws / "output" / "adapter" / "adapter_model.safetensors").is_file()
    assert (ws / "output" / "_SUCCESS").is_file()
    assert containers_of(docker_client, run_id_of(ws)) == []


def test_trainer_exiting_non_zero_fails_the_task_with_the_cause(
        run_dag, mlflow_client, docker_client, trainer_image, tiny_model):
    # A model directory that passes the Airflow-side check (config.json, tokenizer) but
    # has no weights: the trainer in the container exits non-zero.
    broken = tiny_model.parent / "weightless-llama"
    if not broken.exists():
        shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    name = "docker-exit-nonzero"
    state, tis, ws = run_dag(docker_conf(name, base_model="weightless-llama"))
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)
    message = train_error(ws)
    assert message.startswith("training failed (exit ") and "exit 0" not in message
    assert containers_of(docker_client, run_id_of(ws)) == []


def test_container_killed_at_its_memory_limit_says_out_of_memory(
        run_dag, mlflow_client, docker_client, trainer_image):
    name = "docker-oom"
    state, tis, ws = run_dag(docker_conf(name, memory_limit="96m"))
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)
    message = train_error(ws)
    assert "out of memory" in message
    assert containers_of(docker_client, run_id_of(ws)) == []


def test_trainer_killed_mid_run_leaves_no_container_and_a_failed_mlflow_run(
        run_dag, mlflow_client, docker_client, trainer_image):
    """The container dies under the task (as when a worker or the engine kills it)."""
    name = "docker-killed"
    killed = []

    def kill_when_training():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for c in docker_client.containers.list(filters={"label": "loraflow.dag_id=loraflow_finetune"}):
                if b'"event": "log"' in c.logs():
                    c.kill()
                    killed.append(c.name)
                    return
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    state, tis, ws = run_dag(docker_conf(name, max_steps=5000, eval_steps=5000, save_steps=25))
    watcher.join(timeout=5)
    assert killed, "the trainer container was never seen training"
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)


def test_on_kill_stops_and_removes_the_trainer_container(run_dag, docker_client, trainer_image):
    """Airflow calls on_kill when a running train task is stopped (UI, timeout, worker shutdown)."""
    from loraflow.operators import LoraflowTrainOperator

    # A prepared workspace from a run that failed fast (killed at a tiny memory limit),
    # then given room and a long training to be stopped in the middle of.
    state, tis, ws = run_dag(docker_conf("docker-on-kill", memory_limit="96m"))
    assert tis["preprocess"] == "success", tis
    from loraflow.workspace import Pipeline

    pipeline = Pipeline.load(ws)
    (ws / "pipeline.json").write_text(json.dumps({**dataclasses.asdict(pipeline), "memory_limit": ""}))
    job = json.loads((ws / "job.json").read_text())
    job["training"]["max_steps"] = 5000
    (ws / "job.json").write_text(json.dumps(job))

    op = LoraflowTrainOperator(task_id="train", workspace=str(ws))
    outcome = {}

    def execute():
        try:
            op.execute({})
        except Exception as exc:  # the killed task's error is the expected outcome
            outcome["error"] = exc

    task = threading.Thread(target=execute, daemon=True)
    task.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not containers_of(docker_client, pipeline.run_id):
        time.sleep(0.5)
    assert containers_of(docker_client, pipeline.run_id), "the trainer container never started"
    time.sleep(3)
    op.on_kill()
    task.join(timeout=120)
    assert not task.is_alive()
    assert "error" in outcome
    assert containers_of(docker_client, pipeline.run_id) == []
    assert (ws / "data" / "train.parquet").is_file()


def test_gpu_request_without_nvidia_runtime_points_to_gpus_none(run_dag, mlflow_client, docker_client, trainer_image):
    info = docker_client.info()
    if "nvidia" in info.get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime; the error path needs a host without it")
    name = "docker-gpu-missing"
    state, tis, ws = run_dag(conf(name, runtime="docker", gpus="all"))
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)
    message = train_error(ws)
    assert "NVIDIA" in message and "gpus=none" in message
