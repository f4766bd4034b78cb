"""The locally built stack images (scripts/build-stack-images.sh, `make stack-images`) hold what
docker-compose.yaml relies on: the executor it names imports and its worker CLI starts, the
plugin works wherever pip put it, every package is pinned, the admin password is the
operator's. Skipped when the images are not built (the stack test builds them)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.docker.test_compose import compose_config

ENV_FILE = REPO / "build" / "stack-images.env"


def _image(docker_client, key: str, default: str) -> str:
    from docker.errors import ImageNotFound

    images = {}
    if ENV_FILE.exists():
        images = dict(
            line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line and not line.startswith("#")
        )
    tag = images.get(key, default)
    try:
        docker_client.images.get(tag)
    except ImageNotFound:
        pytest.skip(f"{tag} is not built; run make stack-images (scripts/build-stack-images.sh)")
    return tag


@pytest.fixture(scope="module")
def airflow_image(docker_client) -> str:
    return _image(docker_client, "LORAFLOW_AIRFLOW_IMAGE", "loraflow-airflow:0.1.0")


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    proc = compose_config(AIRFLOW_JWT_SECRET="x", AIRFLOW_ADMIN_PASSWORD="y")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]["airflow-worker"]["environment"]


def _run(docker_client, image: str, command: list[str], env: dict[str, str] | None = None) -> str:
    # Not run(remove=True): docker-py can lose the output of a container removed as it exits.
    container = docker_client.containers.run(image, command, environment=env or {}, network_mode="none", detach=True)
    try:
        status = container.wait(timeout=300)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        if status != 0:
            raise AssertionError(
                f"{command} failed in {image} ({status}): {container.logs(stderr=True).decode()[-2000:]}"
            )
        return out
    finally:
        container.remove(force=True)


def test_the_executor_the_compose_file_names_imports_and_its_worker_cli_starts(
    docker_client, airflow_image, compose_env
):
    executor = compose_env["AIRFLOW__CORE__EXECUTOR"]
    env = {
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CELERY__BROKER_URL": compose_env["AIRFLOW__CELERY__BROKER_URL"],
    }
    out = _run(
        docker_client,
        airflow_image,
        [
            "python",
            "-c",
            "from airflow.executors.executor_loader import ExecutorLoader as L; "
            "cls, _ = L.import_default_executor_cls(); "
            "import airflow.providers.celery.executors.celery_executor_utils as u; "
            "print('executor', cls.__name__, 'app', u.app.main, 'broker', u.app.conf.broker_url)",
        ],
        env,
    )
    assert f"executor {executor}" in out and "broker redis://redis:6379/0" in out, out
    # The worker's own entry point parses and loads celery (what crash-looped with celery 5.7).
    help_text = _run(docker_client, airflow_image, ["airflow", "celery", "worker", "--help"], env)
    assert "--concurrency" in help_text and "--queues" in help_text, help_text[-2000:]


def test_every_package_in_the_stack_images_is_pinned(docker_client, airflow_image):
    mlflow_image = _image(docker_client, "LORAFLOW_MLFLOW_IMAGE", "loraflow-mlflow:3.17.2")
    out = _run(
        docker_client,
        airflow_image,
        [
            "python",
            "/opt/loraflow/deploy/check-pins.py",
            "/opt/loraflow/constraints.txt",
            "/opt/loraflow/deploy/constraints-stack.txt",
        ],
    )
    assert "are pinned" in out
    versions = _run(
        docker_client,
        airflow_image,
        [
            "python",
            "-c",
            "import importlib.metadata as m; "
            "print(*(f'{d}=={m.version(d)}' for d in "
            "('celery', 'kombu', 'apache-airflow-providers-celery', 'psycopg2-binary')))",
        ],
    )
    pins = (REPO / "deploy" / "constraints-stack.txt").read_text()
    for pin in versions.split():
        assert pin in pins, (pin, versions)
    assert "are pinned" in _run(
        docker_client,
        mlflow_image,
        ["python", "/opt/pins/check-pins.py", "/opt/pins/constraints.txt", "/opt/pins/constraints-stack.txt"],
    )


@pytest.mark.parametrize("examples_env", ["image default", "unset"])
def test_the_form_default_dataset_resolves_wherever_pip_installed_the_plugin(
    docker_client, airflow_image, compose_env, examples_env
):
    env = {"LORAFLOW_HOME": "/tmp/home", "LORAFLOW_DATA_ROOTS": compose_env["LORAFLOW_DATA_ROOTS"]}
    if examples_env == "unset":  # the wheel's own copy (share/loraflow/examples), no env var, no data roots set
        env = {"LORAFLOW_HOME": "/tmp/home", "LORAFLOW_EXAMPLES": "", "LORAFLOW_DATA_ROOTS": ""}
    out = _run(
        docker_client,
        airflow_image,
        [
            "python",
            "-c",
            "import loraflow, json; from loraflow import params, workspace; "
            "default = params.build_params()['dataset_path'].value; "
            "print(json.dumps({'module': loraflow.__file__, 'default': default, "
            "'resolved': str(workspace.dataset_file(default, 'dataset_path'))}))",
        ],
        env,
    )
    found = json.loads(out.strip().splitlines()[-1])
    assert "site-packages" in found["module"]  # not an editable install
    assert found["resolved"].endswith("examples/data/sample_chat.jsonl"), found


def test_the_admin_password_is_the_one_the_operator_set(docker_client, airflow_image):
    file = "/opt/airflow/simple_auth_manager_passwords.json"
    out = _run(
        docker_client,
        airflow_image,
        ["cat", file],
        {
            "AIRFLOW_ADMIN_PASSWORD": "operator-chosen-pw",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": file,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        },
    )
    assert json.loads(out) == {"admin": "operator-chosen-pw"}
    from docker.errors import ContainerError

    with pytest.raises(ContainerError) as refused:
        docker_client.containers.run(
            airflow_image,
            ["airflow", "api-server"],
            remove=True,
            network_mode="none",
            environment={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": file},
        )
    assert b"AIRFLOW_ADMIN_PASSWORD" in refused.value.stderr
