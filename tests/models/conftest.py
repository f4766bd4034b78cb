"""A registered version from a real pipeline run, and a real Airflow api-server with the plugin.

The version comes from one ``loraflow_finetune`` run (``dag.test()`` in a child process,
local runtime, the tiny model) against the session's MLflow server, so every test here
reads what the pipeline really wrote. The api-server runs with the simple auth manager and
a known password, as an operator would configure it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FAST, SAMPLE_CHAT

MODEL = "models-page-demo"
USER, PASSWORD = "admin", "loraflow-test-pw"
VIEWER, NOBODY = "viewer", "nobody"  # read-only role; signed in but holding no role at all
EDITOR = "editor"  # role "user": the least role that may edit DAG runs, so may move an alias


@pytest.fixture(scope="session")
def registered(stack, airflow_db, mlflow_server, tiny_model) -> dict:
    """The champion of MODEL after one real DAG run: {name, version, run_key, mlflow_run_id}."""
    from mlflow import MlflowClient

    conf = {
        "dataset_path": str(SAMPLE_CHAT),
        "data_format": "chat",
        "registered_model_name": MODEL,
        "runtime": "local",
        **FAST,
    }
    state = stack.run_dag("loraflow_finetune", conf)
    assert state == "success"
    mv = MlflowClient(tracking_uri=mlflow_server).get_model_version_by_alias(MODEL, "champion")
    return {
        "name": MODEL,
        "version": mv.version,
        "run_key": mv.tags["loraflow.run_key"],
        "mlflow_run_id": mv.run_id,
        "tracking_uri": mlflow_server,
    }


@pytest.fixture(scope="session")
def airflow_api(stack, airflow_db, mlflow_server, tmp_path_factory):
    """``airflow api-server`` with the loraflow plugin; yields its base URL. Stopped at the end."""
    from loraflow_devstack import free_port, wait_http

    home = tmp_path_factory.mktemp("api-server")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD, VIEWER: PASSWORD, NOBODY: PASSWORD, EDITOR: PASSWORD}))
    port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin,{VIEWER}:viewer,{NOBODY}:,{EDITOR}:user",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    log = home / "api-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", 150, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def login(base: str, username: str = USER, password: str = PASSWORD) -> str:
    """A JWT from Airflow's token endpoint, as the login page gets one."""
    req = urllib.request.Request(
        f"{base}/auth/token",
        data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["access_token"]


@pytest.fixture
def free_dead_uri() -> str:
    """A tracking URI where nothing listens."""
    from loraflow_devstack import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def train_version(stack, mlflow_server, tiny_model, tmp_path_factory):
    """Train the tiny model with ``loraflow-train`` (a few steps) and register it; returns the version.

    Faster than a DAG run, for tests that need several versions of one model. ``models_root``
    trains against a copy of the base in another model cache, as the container sees
    ``/models/<name>``: the version records that path, which the host does not have.
    """
    from loraflow import registry

    def _train(name: str, *, seed: int = 0, steps: int = 4, models_root: Path | None = None) -> str:
        ws = tmp_path_factory.mktemp(f"ws-{name}")
        base = tiny_model
        if models_root is not None:
            base = models_root / tiny_model.name
            shutil.copytree(tiny_model, base)
        (ws / "job.json").write_text(
            json.dumps(
                {
                    "model": {"base_model": str(base)},
                    "data": {"train_path": str(SAMPLE_CHAT), "eval_path": str(SAMPLE_CHAT), "data_format": "chat"},
                    "training": {
                        "max_steps": steps,
                        "learning_rate": 1e-2,
                        "per_device_train_batch_size": 8,
                        "max_seq_length": 128,
                        "save_steps": 1000,
                        "seed": seed,
                    },
                    "evaluation": {"num_sample_generations": 0},
                    "output_dir": "output",
                }
            )
        )
        env = {**os.environ, "LORAFLOW_MODELS": str(models_root or tiny_model.parent)}
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "loraflow-train"), "--job", str(ws / "job.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        reg = registry.register(
            mlflow_server,
            name=name,
            run_key=f"tests/{name}/{ws.name}",
            workspace=ws,
            params={"quantization": "none"},
            tags={},
            gate_metric="eval_loss",
            dataset_source=str(SAMPLE_CHAT),
        )
        return reg.version

    return _train
