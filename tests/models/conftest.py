"""A registered version from a real pipeline run, and a real Airflow api-server with the plugin.

The version comes from one ``loraflow_finetune`` run (``dag.test()`` in a child process,
local runtime, the tiny model) against the session's MLflow server, so every test here
reads what the pipeline really wrote. The api-server runs with the simple auth manager and
a known password, as an operator would configure it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import SAMPLE_CHAT

MODEL = "models-page-demo"
USER, PASSWORD = "admin", "loraflow-test-pw"
VIEWER, NOBODY = "viewer", "nobody"  # read-only role; signed in but holding no role at all
EDITOR = "editor"  # role "user": the least role that may edit DAG runs, so may move an alias
FAST = {"max_steps": 12, "learning_rate": 1e-2, "max_seq_length": 128, "num_sample_generations": 1,
        "per_device_train_batch_size": 8}


@pytest.fixture(scope="session")
def registered(stack, airflow_db, mlflow_server, tiny_model) -> dict:
    """The champion of MODEL after one real DAG run: {name, version, run_key, mlflow_run_id}."""
    from mlflow import MlflowClient

    conf = {"dataset_path": str(SAMPLE_CHAT), "data_format": "chat", "registered_model_name": MODEL,
            "runtime": "local", **FAST}
    state = stack.run_dag("loraflow_finetune", conf)
    assert state == "success"
    mv = MlflowClient(tracking_uri=mlflow_server).get_model_version_by_alias(MODEL, "champion")
    return {"name": MODEL, "version": mv.version, "run_key": mv.tags["loraflow.run_key"],
            "mlflow_run_id": mv.run_id, "tracking_uri": mlflow_server}


@pytest.fixture(scope="session")
def airflow_api(stack, airflow_db, mlflow_server, tmp_path_factory):
    """``airflow api-server`` with the loraflow plugin; yields its base URL. Stopped at the end."""
    from loraflow.devstack import free_port, wait_http

    home = tmp_path_factory.mktemp("api-server")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD, VIEWER: PASSWORD, NOBODY: PASSWORD, EDITOR: PASSWORD}))
    port = free_port()
    env = {**os.environ, **stack.env(), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin,{VIEWER}:viewer,{NOBODY}:,{EDITOR}:user",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords)}
    log = home / "api-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
    req = urllib.request.Request(f"{base}/auth/token", data=json.dumps({"username": username, "password": password}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["access_token"]


@pytest.fixture
def free_dead_uri() -> str:
    """A tracking URI where nothing listens."""
    from loraflow.devstack import free_port

    return f"http://127.0.0.1:{free_port()}"
