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
    """Run the train task's operator again on this workspace; the error it fails with (AirflowFailException
    where a retry cannot help, TrainerFailed where it can)."""
    from airflow.sdk.exceptions import AirflowFailException

    from loraflow.errors import TrainingError
    from loraflow.operators import LoraflowTrainOperator

    op = LoraflowTrainOperator(task_id="train", workspace=str(ws))
    with pytest.raises((AirflowFailException, TrainingError)) as err:
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


HF_SECRET = "hf_PLANTED_b7c1e5a0d9f24e6c8a31"
MLFLOW_SECRET = "mlflow-PLANTED-5d2e8f0a71c94b3e"


def watch_first_container(docker_client, checks: dict) -> threading.Thread:
    """Inspect the first running trainer container from outside and from inside (docker exec)."""

    def run():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for c in docker_client.containers.list(
                filters={"label": "loraflow.dag_id=loraflow_finetune", "status": "running"}
            ):
                checks["attrs"] = c.attrs
                probe = (
                    "id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/1/status; "
                    "for f in /opt/x /workspace/x /workspace/data/x /workspace/job.json "
                    "/workspace/output/.probe /tmp/.probe; do "
                    'if touch $f 2>/dev/null; then echo "writable $f"; fi; done; rm -f /workspace/output/.probe'
                )
                checks["inside"] = c.exec_run(["sh", "-c", probe]).output.decode()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=run, daemon=True)
    watcher.start()
    return watcher


def test_docker_runtime_trains_in_a_hardened_container_and_registers_the_image_digest(
    run_dag, mlflow_client, mlflow_server, docker_client, trainer_image, monkeypatch, stack, capfd
):
    # Credentials as an operator keeps them: Airflow connections (here from the environment).
    monkeypatch.setenv("AIRFLOW_CONN_LORAFLOW_HF", json.dumps({"conn_type": "generic", "password": HF_SECRET}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_LORAFLOW_MLFLOW", json.dumps({"conn_type": "http", "login": "ci", "password": MLFLOW_SECRET})
    )
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # restored (removed) after the test: the tasks run in this process
    monkeypatch.setenv("LORAFLOW_CONTAINER_PIDS_LIMIT", "2048")  # not the default 4096: the setting reaches the engine
    name = "docker-e2e"
    checks: dict = {}
    watcher = watch_first_container(docker_client, checks)
    state, tis, ws = run_dag(docker_conf(name, memory_limit="2g", shm_size="512m"))
    watcher.join(timeout=5)
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
    # Recorded portably (the container saw the base at /models/tiny-llama), and the plain MLflow
    # path loads it on this host from its own model cache, the weights hash verified.
    assert version.tags["loraflow.base_ref"] == "tiny-llama" and len(version.tags["loraflow.base_sha256"]) == 64
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    [completion] = model.predict(["What is 3 plus 4?"], params={"max_new_tokens": 4})
    assert isinstance(completion, str)

    # The container as Docker ran it.
    assert "attrs" in checks, "the trainer container was never seen running"
    host, cfg = checks["attrs"]["HostConfig"], checks["attrs"]["Config"]
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd") and not host["Privileged"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"] and host["PidsLimit"] == 2048
    assert host["Memory"] == 2 * 1024**3 and host["ShmSize"] == 512 * 1024**2
    assert host["NetworkMode"] == "none"
    assert cfg["User"] and cfg["User"].split(":")[0] not in ("0", "root")
    mounts = {m["Destination"]: m["RW"] for m in checks["attrs"]["Mounts"]}
    assert mounts == {"/workspace": False, "/workspace/output": True, "/models": False}
    assert f"HF_TOKEN={HF_SECRET}" in cfg["Env"]  # the hub token reached the trainer, by its environment only
    assert not any(MLFLOW_SECRET in e for e in cfg["Env"])  # the trainer never talks to MLflow
    # ... and as the trainer sees it from inside.
    inside = checks["inside"].split("\n")
    assert inside[0] != "0", checks["inside"]
    assert "CapEff:\t0000000000000000" in inside and "NoNewPrivs:\t1" in inside, checks["inside"]
    writable = {line.split(" ", 1)[1] for line in inside if line.startswith("writable ")}
    assert writable == {"/workspace/output/.probe", "/tmp/.probe"}, checks["inside"]

    # The MLflow credentials were used by the tasks that talk to MLflow...
    import os

    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == MLFLOW_SECRET
    # ... and neither secret was written anywhere: workspace, task logs, Airflow DB, MLflow
    # (its DB holds params and tags; artifacts are files), the model cache.
    leaked = [
        str(f)
        for f in stack.home.rglob("*")
        if f.is_file() and (HF_SECRET.encode() in f.read_bytes() or MLFLOW_SECRET.encode() in f.read_bytes())
    ]
    assert leaked == []
    out, err = capfd.readouterr()
    assert HF_SECRET not in out + err and MLFLOW_SECRET not in out + err
    run = mlflow_client.get_run(version.run_id)
    assert not any(
        HF_SECRET in str(v) or MLFLOW_SECRET in str(v) for v in [*run.data.params.values(), *run.data.tags.values()]
    )


def test_trainer_exiting_non_zero_fails_the_task_with_the_cause(
    run_dag, mlflow_client, docker_client, trainer_image, tiny_model
):
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


def test_container_killed_at_its_memory_limit_says_out_of_memory(run_dag, mlflow_client, docker_client, trainer_image):
    name = "docker-oom"
    state, tis, ws = run_dag(docker_conf(name, memory_limit="96m"))
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)
    message = train_error(ws)
    assert "out of memory" in message
    assert containers_of(docker_client, run_id_of(ws)) == []


def test_trainer_killed_mid_run_fails_cleanly_and_the_retry_resumes_from_its_checkpoint(
    run_dag, mlflow_client, docker_client, trainer_image, capfd
):
    """The container is SIGKILLed under the task after its first checkpoint (as when a worker
    or the engine kills it); the retry of the train task continues from that checkpoint."""
    from loraflow.operators import LoraflowTrainOperator
    from loraflow.workspace import run_dir

    name = "docker-killed"
    killed = []

    def kill_after_a_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for c in docker_client.containers.list(filters={"label": "loraflow.dag_id=loraflow_finetune"}):
                ckpts = run_dir("loraflow_finetune", c.labels["loraflow.run_id"]) / "output" / "checkpoints"
                if list(ckpts.glob("checkpoint-*/trainer_state.json")):
                    c.kill()
                    killed.append(c.name)
                    return
            time.sleep(0.3)

    watcher = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    watcher.start()
    state, tis, ws = run_dag(docker_conf(name, max_steps=5000, eval_steps=5000, save_steps=5))
    watcher.join(timeout=5)
    assert killed, "the trainer container was never seen past a checkpoint"
    assert_failed_and_cleaned(docker_client, mlflow_client, name, state, tis, ws)

    # The retry (a shorter budget, so the test ends soon) resumes instead of starting over.
    done = max(
        int(p.parent.name.rsplit("-", 1)[1])
        for p in (ws / "output" / "checkpoints").glob("checkpoint-*/trainer_state.json")
    )
    job = json.loads((ws / "job.json").read_text())
    job["training"]["max_steps"] = done + 3
    (ws / "job.json").write_text(json.dumps(job))
    capfd.readouterr()
    LoraflowTrainOperator(task_id="train", workspace=str(ws)).execute({})
    log = "".join(capfd.readouterr())  # the trainer's lines, as the task log shows them
    assert f"resuming from checkpoint /workspace/output/checkpoints/checkpoint-{done}" in log, log[-3000:]
    metrics = json.loads((ws / "output" / "metrics.json").read_text())
    assert metrics["global_step"] == done + 3
    assert (ws / "output" / "_SUCCESS").is_file()
    assert containers_of(docker_client, run_id_of(ws)) == []


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
    # docker stop's SIGTERM: the trainer checkpointed and exited 130, and the task says so.
    from airflow.providers.docker.exceptions import DockerContainerFailedException

    from loraflow.runtimes import TrainerFailed
    from loraflow_trainer.errors import EXIT_INTERRUPTED, EXIT_MEANINGS

    error = outcome.get("error")
    assert isinstance(error, TrainerFailed) and isinstance(error, DockerContainerFailedException), repr(error)
    assert error.exit_code == EXIT_INTERRUPTED, str(error)
    assert str(error).startswith(f"training failed (exit {EXIT_INTERRUPTED}): {EXIT_MEANINGS[EXIT_INTERRUPTED]}"), str(
        error
    )
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
