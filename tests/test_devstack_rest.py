"""A new user's first REST trigger: `make ui` on a fresh home, then the README's steps, verbatim.

``scripts/demo.py --serve-only`` (what ``make ui`` runs) starts MLflow, builds the tiny model,
and starts the api-server, scheduler and dag-processor, here on ports other than the
defaults (so the execution API URL must follow the api-server's port). The bash block of
the README's "Trigger through the REST API" section then runs as a user would paste it: a
token from /auth/token, unpause, POST dagRuns with a conf and a logical date, poll, and
read the registered version from MLflow. `make stop` ends the servers.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.test_devstack import listen_addresses, make, user_env

pytestmark = pytest.mark.slow


def readme_rest_steps() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Trigger through the REST API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_first_rest_trigger_after_make_ui_follows_the_readme_to_a_registered_version(tmp_path):
    from mlflow import MlflowClient

    from loraflow_devstack import free_port, port_taken

    home = tmp_path / "home"
    ports = {
        "LORAFLOW_AIRFLOW_PORT": str(free_port()),
        "LORAFLOW_MLFLOW_PORT": str(free_port()),
        "LORAFLOW_AIRFLOW_LOG_PORT": str(free_port()),
    }
    env = user_env(home, **ports)
    try:
        up = make("--serve-only", env, timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (home / "models" / "tiny-llama" / "config.json").exists()  # the form's default base_model
        # Loopback only by default (LORAFLOW_BIND unset).
        assert listen_addresses(int(ports["LORAFLOW_AIRFLOW_PORT"])) == {"127.0.0.1"}
        assert listen_addresses(int(ports["LORAFLOW_MLFLOW_PORT"])) == {"127.0.0.1"}

        steps = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", readme_rest_steps()],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert steps.returncode == 0, steps.stdout + steps.stderr
        lines = steps.stdout.strip().splitlines()
        assert lines[-2].endswith(": success"), steps.stdout
        version = lines[-1]

        mc = MlflowClient(tracking_uri=f"http://127.0.0.1:{ports['LORAFLOW_MLFLOW_PORT']}")
        mv = mc.get_model_version("my-first-model", version)
        assert mv.tags["loraflow.run_key"].startswith("loraflow_finetune/rest-")
        assert mv.tags["loraflow.base_model"].endswith("tiny-llama")
        assert mc.get_run(mv.run_id).data.params["max_steps"] == "10"
    finally:
        down = make("--stop", env)
        logs = "".join(p.read_text()[-3000:] for p in sorted((home / "logs").glob("*.log")))
    assert down.returncode == 0, down.stdout + logs
    assert "stopped airflow-api-server" in down.stdout and "stopped mlflow" in down.stdout, down.stdout + logs
    assert not any(port_taken(int(p)) for p in ports.values())
