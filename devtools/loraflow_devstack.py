"""The embedded local stack: a local MLflow tracking server, a local Airflow home and DB.

Development tooling, not part of the installed ``loraflow`` package: ``scripts/demo.py``
(``make demo``/``make ui``/``make stop``), the test session (``tests/conftest.py``) and the
benchmarks import it with ``devtools/`` on ``sys.path``, so the demo a new user runs and
the stack the tests run against are the same thing. Servers are real processes started
with argument lists.

Settings (environment or Make variables): ``LORAFLOW_AIRFLOW_PORT`` (api-server, 8080; the
execution API URL the workers call follows it), ``LORAFLOW_MLFLOW_PORT`` (5000),
``LORAFLOW_AIRFLOW_LOG_PORT`` (the scheduler's log server, 8793) and ``LORAFLOW_BIND``
(the address the servers listen on, 127.0.0.1: loopback only unless told otherwise).

Each ``LORAFLOW_HOME`` owns its servers: every server it starts is recorded in
``<home>/pids/<name>.json`` (pid, its start time, port, command), a port already taken by anything
else is refused with a message naming the port and the variable to change, and
``stop_all`` ends only processes whose pidfile this home wrote and whose start time
still matches it (a pid reused by another process is left alone).
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
from loraflow_trainer import contract

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port`` (or could not be bound for another reason)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200, or fail naming the server log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise LoraflowError(
                f"server for {url} exited with {proc.returncode} before it was healthy; its log ends:\n{tail}"
            )
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


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise LoraflowError(f"{name}={raw!r} is not a port number; set it to a free TCP port such as {default}")
    return int(raw)


def _started(pid: int) -> str | None:
    """When a live process started (clock ticks since boot, /proc/<pid>/stat field 22), or None
    when it is gone or a zombie. A pid and its start time name one process: a reused pid differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


@dataclass
class LocalStack:
    home: Path
    repo: Path
    mlflow_port: int = field(default_factory=lambda: _env_port("LORAFLOW_MLFLOW_PORT", 5000))
    airflow_port: int = field(default_factory=lambda: _env_port("LORAFLOW_AIRFLOW_PORT", 8080))
    log_server_port: int = field(default_factory=lambda: _env_port("LORAFLOW_AIRFLOW_LOG_PORT", 8793))
    bind: str = field(default_factory=lambda: os.environ.get("LORAFLOW_BIND", "").strip() or "127.0.0.1")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # Which variable moves which port: named in every conflict message.
    PORT_VARIABLES = {
        "mlflow": "LORAFLOW_MLFLOW_PORT",
        "airflow-api-server": "LORAFLOW_AIRFLOW_PORT",
        "airflow-scheduler": "LORAFLOW_AIRFLOW_LOG_PORT",
    }

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
    def connect_host(self) -> str:
        """Where clients on this machine reach the servers (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.connect_host}:{self.mlflow_port}"

    @property
    def airflow_url(self) -> str:
        return f"http://{self.connect_host}:{self.airflow_port}"

    @property
    def password_file(self) -> Path:
        """Where the simple auth manager writes the generated admin password."""
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"

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
            # A new user's first trigger runs: the DAG is not parked paused at creation.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
            # An import path every Airflow process of this stack resolves: the plugin's, not this dev module's.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "loraflow.config.SQLITE_CONNECT_ARGS",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "loraflow.config.SQLITE_CONNECT_ARGS_ASYNC",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__API__PORT": str(self.airflow_port),
            "AIRFLOW__API__HOST": self.bind,
            # Task processes report to the api-server of this home, on its port.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_server_port),
        }

    def configure_airflow_env(self) -> None:
        """Export the stack's environment into this process (before airflow is imported)."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        os.environ.update(self.env())

    # -- MLflow ------------------------------------------------------------------

    def start_mlflow(self, detach: bool = False, timeout: float = 300) -> str:
        """Start this home's MLflow server, or find it running; return what happened."""
        if self.running("mlflow"):  # ours, perhaps still starting: wait for it rather than start a second one
            self._require_same_port("mlflow", self.mlflow_port)
            wait_http(f"{self.mlflow_uri}/health", timeout, None, self._log("mlflow"))
            return f"MLflow of this home already running on {self.mlflow_uri} (pid {self.running('mlflow')})"
        self._require_free("mlflow", self.mlflow_port)
        self.mlflow_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.mlflow_dir / "artifacts"),
            "--host",
            self.bind,
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
        ]
        # loraflow uses no MLflow server jobs (GenAI judges, prompt optimisation): without this the
        # server starts a job runner and ~8 huey consumer processes, ~2 GB and seconds of CPU each start.
        self._spawn("mlflow", cmd, detach, self.mlflow_port, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_http(f"{self.mlflow_uri}/health", timeout, self.procs.get("mlflow"), self._log("mlflow"))
        return f"started MLflow on {self.mlflow_uri} (pid {self.procs['mlflow'].pid})"

    # -- Airflow -----------------------------------------------------------------

    def migrate_airflow_db(self) -> None:
        """Migrate the metadata DB and create the training pool (one slot per GPU)."""
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env={**os.environ, **self.env()},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        gpus.ensure_pool(self.env())

    def start_airflow_ui(self, detach: bool = True, timeout: float = 300) -> list[str]:
        """Start this home's api-server, scheduler and dag-processor (those not already running)."""
        done = []
        for component in AIRFLOW_COMPONENTS:
            name = f"airflow-{component}"
            port = {"api-server": self.airflow_port, "scheduler": self.log_server_port}.get(component)
            if self.running(name):
                self._require_same_port(name, port)
                done.append(f"{name} of this home already running (pid {self.running(name)})")
                continue
            if port is not None:
                self._require_free(name, port)
            cmd = [sys.executable, "-m", "airflow", component]
            if component == "api-server":
                cmd += ["--port", str(self.airflow_port), "--host", self.bind]
            self._spawn(name, cmd, detach, port)
            done.append(f"started {name} (pid {self.procs[name].pid})")
        proc = self.procs.get("airflow-api-server")
        wait_http(f"{self.airflow_url}/api/v2/monitor/health", timeout, proc, self._log("airflow-api-server"))
        return done

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
            env={**os.environ, **self.env()},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        print(proc.stdout[-20000:], flush=True)
        for line in proc.stdout.splitlines():
            if line.startswith("LORAFLOW_DAG_STATE="):
                return line.split("=", 1)[1]
        raise LoraflowError(f"the DAG run of {dag_id} did not finish (exit {proc.returncode}); see the log above")

    # -- the tiny model ----------------------------------------------------------

    def ensure_tiny_model(self, corpus: Path, name: str = "tiny-llama") -> Path:
        out = self.models_dir / name
        if contract.is_model_dir(out):
            return out
        cmd = [_bin("loraflow-train"), "make-tiny-model", "--out", str(out), "--data", str(corpus)]
        subprocess.run(cmd, check=True)
        return out

    # -- reading back ------------------------------------------------------------

    def describe_model(self, name: str) -> dict:
        from loraflow import registry

        return registry.show(self.mlflow_uri, registry.Ref(name))

    # -- processes ---------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _pidfile(self, name: str) -> Path:
        return self.home / "pids" / f"{name}.json"

    def running(self, name: str) -> int | None:
        """The pid of server ``name`` if this home started it and it still runs, else None."""
        path = self._pidfile(name)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        pid = int(record.get("pid", 0))
        return pid if pid > 0 and _started(pid) == record.get("started") else None

    def _require_same_port(self, name: str, port: int | None) -> None:
        recorded = json.loads(self._pidfile(name).read_text()).get("port")
        if port is not None and recorded != port:
            raise LoraflowError(
                f"{name} of this home already runs on port {recorded}, not {port} ({self.PORT_VARIABLES[name]}); "
                f"run `make stop` first to move it"
            )

    def _require_free(self, name: str, port: int) -> None:
        if port_taken(port, self.bind):
            raise LoraflowError(
                f"port {port} (for {name}) is already taken by a process this home ({self.home}) did not start; "
                f"stop that process or set {self.PORT_VARIABLES[name]} to a free port"
            )

    def _spawn(self, name: str, cmd: list[str], detach: bool, port: int | None = None, env: dict | None = None) -> None:
        log = self._log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env(), **(env or {})},
                start_new_session=detach,
            )
        self.procs[name] = proc
        self._pidfile(name).write_text(
            json.dumps(
                {"pid": proc.pid, "started": _started(proc.pid), "port": port, "cmd": cmd, "home": str(self.home)}
            )
        )

    def stop_all(self) -> list[str]:
        """Stop the servers this home started (and only those); return what was done, truthfully."""
        report = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                _terminate(proc.pid)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _terminate(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                report.append(f"stopped {name} (pid {proc.pid})")
            self._pidfile(name).unlink(missing_ok=True)
        self.procs.clear()
        pids = self.home / "pids"
        for pidfile in sorted(pids.glob("*.json")) if pids.exists() else []:
            name = pidfile.stem
            pid = self.running(name)
            if pid is None:
                report.append(f"{name} was not running (removed its stale pidfile)")
            else:
                _terminate(pid)
                if not _wait_gone(pid, 30):
                    _terminate(pid, signal.SIGKILL)
                    _wait_gone(pid, 10)
                report.append(f"stopped {name} (pid {pid})")
            pidfile.unlink(missing_ok=True)
        for legacy in sorted(pids.glob("*.pid")) if pids.exists() else []:
            # Pidfiles of the old format record no start time: the pid may have been reused, so leave it.
            pid = legacy.read_text().strip()
            report.append(f"left pid {pid} alone ({legacy.name} records no start time to check it against)")
            legacy.unlink(missing_ok=True)
        return report


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _started(pid) is None:
            return True
        time.sleep(0.2)
    return False


def _terminate(pid: int, sig: int = signal.SIGTERM) -> None:
    # Detached servers lead their own process group with their workers (gunicorn/uvicorn):
    # end the group; a server started attached (tests) is ended by its pid alone.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
