"""The local stack's ports are settings and each LORAFLOW_HOME owns its servers.

Through the commands a person runs (``scripts/demo.py`` is what ``make ui`` / ``make stop``
run), with real servers and real sockets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DEMO = [sys.executable, str(REPO / "scripts" / "demo.py")]


def user_env(home: Path, **settings: str) -> dict[str, str]:
    """A shell as a new user has it: none of the test session's Airflow/MLflow/loraflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LORAFLOW_", "MLFLOW_TRACKING"))}
    return {**env, "LORAFLOW_HOME": str(home), **settings}


def make(target_flag: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*DEMO, target_flag], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def listen_addresses(port: int) -> set[str]:
    """The local addresses something listens on at ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


def test_a_port_taken_by_something_else_is_refused_naming_the_port_and_the_variable(tmp_path):
    from loraflow_devstack import free_port

    with socket.socket() as other:  # not this home's server: any process holding the port
        port = free_port()
        other.bind(("127.0.0.1", port))
        other.listen()
        out = make("--serve-only", user_env(tmp_path / "home", LORAFLOW_MLFLOW_PORT=str(port)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"port {port}" in out.stderr and "LORAFLOW_MLFLOW_PORT" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "home").glob("pids/*.json"))  # nothing started, nothing claimed


def test_a_port_setting_that_is_not_a_port_is_refused(tmp_path):
    out = make("--serve-only", user_env(tmp_path / "home", LORAFLOW_AIRFLOW_PORT="80a"))
    assert out.returncode == 2 and "LORAFLOW_AIRFLOW_PORT='80a' is not a port number" in out.stderr, out.stderr


@pytest.mark.slow
def descendants(pid: int) -> list[str]:
    """The command lines of every process under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found.append((Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
        todo += children.get(child, [])
    return found


def test_each_home_owns_its_servers_and_stop_stops_only_its_own(tmp_path):
    from loraflow.errors import LoraflowError
    from loraflow_devstack import LocalStack, free_port, port_taken

    port = free_port()
    mine = LocalStack(home=tmp_path / "a", repo=REPO, mlflow_port=port)
    other = LocalStack(home=tmp_path / "b", repo=REPO, mlflow_port=port)
    try:
        mine.start_mlflow(detach=True, timeout=240)
        pid = mine.running("mlflow")
        assert pid and json.loads((tmp_path / "a" / "pids" / "mlflow.json").read_text())["port"] == port
        # The server runs without MLflow's job runner and its huey consumers (loraflow uses no server jobs).
        tree = descendants(pid)
        assert tree and not [cmd for cmd in tree if "huey" in cmd or "_job_runner" in cmd], tree

        # A second home on the same port: refused, not silently reusing the first home's server.
        with pytest.raises(LoraflowError, match=f"port {port} .*LORAFLOW_MLFLOW_PORT"):
            other.start_mlflow(detach=True)
        # `make stop` in the second home stops nothing and says so.
        out = make("--stop", user_env(tmp_path / "b", LORAFLOW_MLFLOW_PORT=str(port)))
        assert out.returncode == 0 and "no servers of this home" in out.stdout, out.stdout + out.stderr
        assert mine.running("mlflow") == pid and port_taken(port)

        # `make stop` in the owning home stops its server and names it.
        out = make("--stop", user_env(tmp_path / "a", LORAFLOW_MLFLOW_PORT=str(port)))
        assert out.returncode == 0 and f"stopped mlflow (pid {pid})" in out.stdout, out.stdout + out.stderr
        assert mine.running("mlflow") is None and not port_taken(port)
    finally:
        mine.stop_all()


def test_stop_leaves_alone_a_process_that_reused_a_recorded_pid(tmp_path):
    """A pidfile whose pid now belongs to another process (start time differs): not killed."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pids = tmp_path / "home" / "pids"
        pids.mkdir(parents=True)
        record = {"pid": stranger.pid, "started": "1", "port": 5000, "cmd": ["mlflow"]}
        (pids / "mlflow.json").write_text(json.dumps(record))
        out = make("--stop", user_env(tmp_path / "home"))
        assert out.returncode == 0 and "mlflow was not running" in out.stdout, out.stdout + out.stderr
        assert stranger.poll() is None  # still alive
        assert not (pids / "mlflow.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_the_embedded_airflow_db_waits_for_a_busy_writer_instead_of_failing(tmp_path):
    """Airflow as the stack configures it opens sqlite in WAL mode with a 60 s busy timeout
    (sqlite3's default is 5 s, which bursts of REST triggers exceeded: "database is locked")."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, 'devtools')\n"
        "from loraflow_devstack import LocalStack\n"
        "LocalStack(home=Path(sys.argv[1]), repo=Path(sys.argv[2])).configure_airflow_env()\n"
        "from airflow import settings\n"
        "cur = settings.engine.raw_connection().cursor()\n"
        "print(cur.execute('PRAGMA busy_timeout').fetchone()[0], cur.execute('PRAGMA journal_mode').fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "home"), str(REPO)],
        env=user_env(tmp_path / "home"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["60000", "wal"], out.stdout


def test_a_running_server_of_this_home_on_another_port_is_not_silently_reused(tmp_path):
    """Changing LORAFLOW_MLFLOW_PORT while this home's server runs: told to stop it first; `make stop` stops it."""
    from loraflow.errors import LoraflowError
    from loraflow_devstack import LocalStack, _started, free_port

    server = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for this home's MLflow
    try:
        pids = tmp_path / "home" / "pids"
        pids.mkdir(parents=True)
        record = {"pid": server.pid, "started": _started(server.pid), "port": 1234, "cmd": ["sleep"]}
        (pids / "mlflow.json").write_text(json.dumps(record))
        stack = LocalStack(home=tmp_path / "home", repo=REPO, mlflow_port=free_port())
        with pytest.raises(LoraflowError, match="mlflow of this home already runs on port 1234.*make stop"):
            stack.start_mlflow()
        out = make("--stop", user_env(tmp_path / "home"))
        assert out.returncode == 0 and f"stopped mlflow (pid {server.pid})" in out.stdout, out.stdout + out.stderr
        assert server.wait(timeout=30) is not None
    finally:
        if server.poll() is None:
            server.kill()
