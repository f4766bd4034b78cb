"""Fixtures for the tests that need a real Docker engine and the trainer image.

Every test here is marked ``docker``. Without a reachable engine they skip, saying how to
start one (scripts/start-docker.sh); a missing image skips too, naming the build script
(`make docker-image` builds both before `make test`). The pipeline fixtures (Airflow DB,
MLflow server, tiny model, ``run_dag``) are the ones tests/pipeline uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pipeline.conftest import dag, mlflow_client, run_dag  # noqa: F401  (shared fixtures)

DOCKER_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DOCKER_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def docker_client():
    import docker

    from loraflow import config

    url = config.docker_url()
    try:
        client = docker.DockerClient(base_url=url, timeout=120)
        client.ping()
    except Exception as exc:  # no engine here: these tests cannot run, the rest of the suite can
        pytest.skip(
            f"no Docker engine reachable at {url} ({type(exc).__name__}); start one with scripts/start-docker.sh"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def trainer_image(docker_client) -> str:
    """The trainer image tag the DAG uses (LORAFLOW_IMAGE), present on the engine."""
    from docker.errors import ImageNotFound

    from loraflow import config

    tag = config.image()
    try:
        docker_client.images.get(tag)
    except ImageNotFound:
        pytest.skip(f"trainer image {tag} is not built; run scripts/build-trainer-image.sh (make docker-image)")
    return tag


@pytest.fixture
def run_containers(docker_client):
    """Containers a test starts by hand, removed afterwards whatever happened."""
    started = []
    yield started
    for c in started:
        try:
            c.remove(force=True)
        except Exception:
            pass


def trainer_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "trainer_image" / "pyproject.toml").read_text())["project"]["version"]


def containers_of(docker_client, run_id: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"loraflow.run_id={run_id}"})


def host_uid_gid() -> str:
    return f"{os.getuid()}:{os.getgid()}"
