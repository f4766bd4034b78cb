"""The compose stack (docker-compose.yaml) brought up for real on the locally built images.

Runs only under ``make stack-test`` (LORAFLOW_STACK_TEST=1): it builds every image first
(scripts/build-stack-images.sh writes build/stack-images.env), and one pass takes many
minutes. A throwaway project (its own name, ports, host folder and secrets) is brought up
with ``docker compose up -d --wait`` and taken down with ``down -v`` whatever happened.
Everything is checked through the interfaces an operator has: Airflow's REST API, MLflow's
REST API, the Docker engine's API (``docker compose logs/ps``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.docker.test_compose import compose_binary

ENV_FILE = REPO / "build" / "stack-images.env"
PROJECT = "loraflow-stacktest"
DAG = "loraflow_finetune"
TIMINGS = REPO / "build" / "stack-test-timings.json"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)
            if os.environ.get("LORAFLOW_STACK_TEST") != "1":
                item.add_marker(
                    pytest.mark.skip(
                        reason="the compose stack test runs with `make stack-test` (LORAFLOW_STACK_TEST=1)"
                    )
                )


@dataclass
class Stack:
    """One compose project and the clients of its APIs."""

    env: dict[str, str]
    home: Path
    airflow: str
    mlflow: str
    password: str
    timings: dict[str, float] = field(default_factory=dict)
    _token: str = ""

    # ---- compose -------------------------------------------------------------------
    def compose(self, *args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
        cmd = [compose_binary(), "-p", PROJECT, "-f", str(REPO / "docker-compose.yaml"), *args]
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def up(self, *extra: str) -> float:
        start = time.monotonic()
        proc = self.compose("up", "-d", "--wait", "--wait-timeout", "900", *extra, check=False)
        if proc.returncode != 0:
            logs = self.compose("logs", "--tail", "40", check=False).stdout
            raise AssertionError(
                f"compose up failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n--- logs ---\n{logs[-8000:]}"
            )
        self._token = ""
        return time.monotonic() - start

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def containers(self, service: str) -> list[str]:
        out = self.compose("ps", "-q", service, check=False).stdout
        return [c for c in out.split() if c]

    # ---- Airflow REST API --------------------------------------------------------------
    def token(self) -> str:
        if not self._token:
            self._token = _request(
                "POST", f"{self.airflow}/auth/token", {"username": "admin", "password": self.password}
            )["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None):
        return _request(method, f"{self.airflow}/api/v2{path}", body, {"Authorization": f"Bearer {self.token()}"})

    def trigger(self, conf: dict, dag: str = DAG) -> str:
        run = self.api("POST", f"/dags/{dag}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def wait_runs(self, run_ids: list[str], timeout: float = 2400, dag: str = DAG) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {r: self.api("GET", f"/dags/{dag}/dagRuns/{_q(r)}")["state"] for r in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(10)
        raise AssertionError(f"runs still not finished after {timeout:.0f} s: {states}")

    def task_instances(self, run_id: str, dag: str = DAG) -> dict[str, dict]:
        tis = self.api("GET", f"/dags/{dag}/dagRuns/{_q(run_id)}/taskInstances?limit=100")["task_instances"]
        return {
            ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]": ti for ti in tis
        }

    def xcom(self, run_id: str, task_id: str, key: str = "return_value"):
        entry = self.api("GET", f"/dags/{DAG}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/xcomEntries/{key}")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) and value.startswith('"') else value

    def host_path(self, container_path: str) -> Path:
        """A path under the Airflow containers' LORAFLOW_HOME as this host sees it (the host folder)."""
        return self.home / Path(container_path).relative_to("/opt/loraflow-home")

    def task_log(self, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        path = (
            f"/dags/{DAG}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/logs/{try_number}"
            f"?full_content=true&map_index={map_index}"
        )
        body = _request(
            "GET",
            f"{self.airflow}/api/v2{path}",
            None,
            {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"},
        )
        content = body.get("content", body)
        if isinstance(content, list):
            return "\n".join(e.get("event", "") if isinstance(e, dict) else str(e) for e in content)
        return str(content)

    # ---- MLflow REST API ---------------------------------------------------------------
    def mlflow_api(self, method: str, path: str, body: dict | None = None):
        if method == "GET" and body:
            path = f"{path}?{urllib.parse.urlencode(body)}"
            body = None
        return _request(method, f"{self.mlflow}/api/2.0/mlflow/{path}", body)

    def versions(self, name: str) -> list[dict]:
        try:
            found = self.mlflow_api("GET", "model-versions/search", {"filter": f"name='{name}'", "max_results": 200})
        except AssertionError:
            return []
        return found.get("model_versions", [])

    def runs(self, experiment: str, filter_string: str) -> list[dict]:
        exp = self.mlflow_api("GET", "experiments/get-by-name", {"experiment_name": experiment})["experiment"]
        found = self.mlflow_api(
            "POST",
            "runs/search",
            {"experiment_ids": [exp["experiment_id"]], "filter": filter_string, "max_results": 100},
        )
        return found.get("runs", [])

    def aliases(self, name: str) -> dict[str, str]:
        model = self.mlflow_api("GET", "registered-models/get", {"name": name})["registered_model"]
        return {a["alias"]: a["version"] for a in model.get("aliases", [])}


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _request(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url} -> {exc.code}: {exc.read()[:2000]!r}") from None
    return json.loads(raw) if raw else {}


def _free_port() -> int:
    from loraflow_devstack import free_port

    return free_port()


@pytest.fixture(scope="session")
def stack(tiny_model) -> Stack:
    if not ENV_FILE.exists():
        pytest.fail(f"{ENV_FILE} is missing: build the images first (make stack-images)")
    images = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if line and not line.startswith("#"))
    home = Path(tempfile.mkdtemp(prefix="loraflow-stack-"))
    # The trainer containers (uid 1000) read the model cache; airflow-init owns the folders.
    shutil.copytree(tiny_model, home / "models" / "tiny-llama")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_", "AIRFLOW_", "MLFLOW_", "AIRFLOW__"))}
    password = secrets.token_hex(12)
    airflow_port, mlflow_port = _free_port(), _free_port()
    env = {
        **clean,
        **images,
        "AIRFLOW_JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW_ADMIN_PASSWORD": password,
        "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "LORAFLOW_HOST_HOME": str(home),
        "AIRFLOW_PORT": str(airflow_port),
        "MLFLOW_PORT": str(mlflow_port),
        "LORAFLOW_GPU_SLOTS": "1",
        # The killed-worker test: the scheduler gives up on the dead worker's task sooner than 300 s.
        "AIRFLOW_TASK_HEARTBEAT_TIMEOUT": "90",
    }
    s = Stack(
        env=env,
        home=home,
        airflow=f"http://127.0.0.1:{airflow_port}",
        mlflow=f"http://127.0.0.1:{mlflow_port}",
        password=password,
    )
    s.compose("down", "-v", "--remove-orphans", check=False)
    try:
        s.timings["up_first_s"] = round(s.up(), 1)
        yield s
    finally:
        if os.environ.get("LORAFLOW_KEEP_STACK") != "1":
            s.compose("down", "-v", "--remove-orphans", check=False, timeout=600)
            shutil.rmtree(home, ignore_errors=True)
        TIMINGS.parent.mkdir(exist_ok=True)
        TIMINGS.write_text(json.dumps(s.timings, indent=2) + "\n")
