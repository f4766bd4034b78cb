"""The embedded local stack: a local MLflow tracking server, a local Airflow home and DB.

Used by ``make demo``/``make ui`` and by the test session, so the demo a new user runs and
the stack the tests run against are the same thing. Servers are real processes started
with argument lists; their pids are kept under ``<home>/pids`` so ``make stop`` can end them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import gpus
from loraflow.errors import LoraflowError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200, or fail naming the server log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise LoraflowError(f"server for {url} exited with {proc.returncode} before it was healthy; its log ends:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise LoraflowError(f"{url} did not become healthy within {timeout:.0f}s; see {log}")


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv may not be on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class LocalStack:
    home: Path
    repo: Path
    mlflow_port: int = 5000
    airflow_port: int = 8080
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def models_dir(self) -> Path:
        return Path(os.environ.get("LORAFLOW_MODELS", self.home / "models"))

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """The environment Airflow, the trainer and MLflow clients of this stack read."""
        return {
            "LORAFLOW_HOME": str(self.home),
            "LORAFLOW_MODELS": str(self.models_dir),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.repo / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__API__PORT": str(self.airflow_port),
        }

    def configure_airflow_env(self) -> None:
        """Export the stack's environment into this process (before airflow is imported)."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        os.environ.update(self.env())

    # -- MLflow ------------------------------------------------------------------

    def start_mlflow(self, detach: bool = False, timeout: float = 90) -> None:
        if self._healthy(f"{self.mlflow_uri}/health"):
            return
        self.mlflow_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(self.mlflow_dir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.mlflow_port),
            "--workers", "1",
        ]
        self._spawn("mlflow", cmd, detach)
        wait_http(f"{self.mlflow_uri}/health", timeout, self.procs.get("mlflow"), self._log("mlflow"))

    # -- Airflow -----------------------------------------------------------------

    def migrate_airflow_db(self) -> None:
        """Migrate the metadata DB and create the training pool (one slot per GPU)."""
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env={**os.environ, **self.env()}, check=True, stdout=subprocess.DEVNULL,
        )
        gpus.ensure_pool(self.env())

    def start_airflow_ui(self, detach: bool = True, timeout: float = 120) -> None:
        for component in ("api-server", "scheduler", "dag-processor"):
            cmd = [sys.executable, "-m", "airflow", component]
            if component == "api-server":
                cmd += ["--port", str(self.airflow_port)]
            self._spawn(f"airflow-{component}", cmd, detach)
        wait_http(f"http://127.0.0.1:{self.airflow_port}/api/v2/monitor/health", timeout,
                  self.procs.get("airflow-api-server"), self._log("airflow-api-server"))

    def run_dag(self, dag_id: str, conf: dict) -> str:
        """Run one DAG run with ``dag.test()`` in a child process; return its final state."""
        code = (
            "import json, sys\n"
            "from airflow.dag_processing.dagbag import DagBag\n"
            "bag = DagBag(dag_folder=sys.argv[1])\n"
            "assert not bag.import_errors, bag.import_errors\n"
            "run = bag.get_dag(sys.argv[2]).test(run_conf=json.loads(sys.argv[3]))\n"
            "print('LORAFLOW_DAG_STATE=' + str(run.state))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(self.repo / "dags"), dag_id, json.dumps(conf)],
            env={**os.environ, **self.env()}, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        print(proc.stdout[-20000:], flush=True)
        for line in proc.stdout.splitlines():
            if line.startswith("LORAFLOW_DAG_STATE="):
                return line.split("=", 1)[1]
        raise LoraflowError(f"the DAG run of {dag_id} did not finish (exit {proc.returncode}); see the log above")

    # -- the tiny model ----------------------------------------------------------

    def ensure_tiny_model(self, corpus: Path, name: str = "tiny-llama") -> Path:
        out = self.models_dir / name
        if (out / "config.json").exists():
            return out
        subprocess.run([_bin("loraflow-train"), "make-tiny-model", "--out", str(out), "--data", str(corpus)], check=True)
        return out

    # -- reading back ------------------------------------------------------------

    def describe_model(self, name: str) -> dict:
        from loraflow import lookup

        return lookup.describe_latest(name, tracking_uri=self.mlflow_uri)

    # -- processes ---------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _pidfile(self, name: str) -> Path:
        return self.home / "pids" / f"{name}.pid"

    def _spawn(self, name: str, cmd: list[str], detach: bool) -> None:
        log = self._log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env()},
                start_new_session=detach,
            )
        self.procs[name] = proc
        self._pidfile(name).write_text(str(proc.pid))

    def stop_all(self) -> None:
        for name, proc in list(self.procs.items()):
            _terminate(proc.pid)
            proc.wait(timeout=30)
            self._pidfile(name).unlink(missing_ok=True)
        self.procs.clear()
        pids = self.home / "pids"
        for pidfile in pids.glob("*.pid") if pids.exists() else []:
            _terminate(int(pidfile.read_text()))
            pidfile.unlink(missing_ok=True)

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False


def _terminate(pid: int) -> None:
    # Servers spawn workers (gunicorn/uvicorn): end the whole process group.
    for sig in (signal.SIGTERM,):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
