"""Several runs triggered at once on a real scheduler: the GPU pool queues them, and no two
training containers hold the same GPU at the same time.

A second Airflow (its own home and DB; api-server + scheduler + dag-processor with the
LocalExecutor) runs three triggered runs of loraflow_finetune with runtime=docker and
gpus=auto, on a worker configured with two GPUs. This machine has no GPU driver, so the
GPUs are named by LORAFLOW_GPU_IDS and handed to the container as NVIDIA_VISIBLE_DEVICES
(LORAFLOW_GPU_REQUEST=env), which runc ignores, and the trainer runs one CPU process per
leased GPU (LORAFLOW_GPUS_ON_CPU=1): that is the only stand-in. The pool, the
scheduler, the leases, the containers and their labels are real; what the test reads is
Docker's own event log and Airflow's task instances.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_CHAT
from tests.pipeline.conftest import FAST

pytestmark = pytest.mark.slow

RUNS = 3
GPUS = "0,1"


@pytest.fixture
def scheduler_stack(stack, mlflow_server, tiny_model, tmp_path):
    """A second, scheduled Airflow on its own DB; yields a function that runs its CLI."""
    from loraflow_devstack import LocalStack, free_port, wait_http

    own = LocalStack(home=stack.home, repo=REPO, mlflow_port=stack.mlflow_port, airflow_port=free_port())
    airflow_home = tmp_path / "airflow"
    airflow_home.mkdir()
    env = {
        **os.environ,
        **own.env(),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{own.airflow_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "LORAFLOW_GPU_IDS": GPUS,
        "LORAFLOW_GPU_SLOTS": "2",
        "LORAFLOW_GPU_REQUEST": "env",
        "LORAFLOW_GPUS_ON_CPU": "1",  # the trainer refuses leased GPUs it cannot see, except under this stand-in
        "LORAFLOW_MAX_ACTIVE_RUNS": str(RUNS),
    }

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'plugins'); from loraflow import gpus; gpus.ensure_pool()",
        ],
        env=env,
        check=True,
        cwd=REPO,
    )
    procs = []
    for component in ("api-server", "scheduler", "dag-processor"):
        extra = ["--port", str(own.airflow_port)] if component == "api-server" else []
        log = (tmp_path / f"{component}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "airflow", component, *extra],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        wait_http(
            f"http://127.0.0.1:{own.airflow_port}/api/v2/monitor/health", 180, procs[0], tmp_path / "api-server.log"
        )
        deadline = time.monotonic() + 180
        while "loraflow_finetune" not in cli("dags", "list", "-o", "plain"):
            assert time.monotonic() < deadline, (tmp_path / "dag-processor.log").read_text()[-3000:]
            time.sleep(3)
        yield cli, airflow_home
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)


def _train_windows(docker_client, since: float, until: float) -> list[dict]:
    """(container, gpu, start, end) of each trainer container, from the engine's event log."""
    by_id: dict[str, dict] = {}
    for ev in docker_client.events(
        since=int(since),
        until=int(until) + 1,
        decode=True,
        filters={"type": "container", "label": "loraflow.dag_id=loraflow_finetune"},
    ):
        attrs = ev.get("Actor", {}).get("Attributes", {})
        entry = by_id.setdefault(
            ev["id"],
            {
                "gpu": attrs.get("loraflow.gpu"),
                "run": attrs.get("loraflow.run_id"),
                "task": attrs.get("loraflow.task_id"),
            },
        )
        if ev.get("status") == "start":
            entry["start"] = ev["timeNano"] / 1e9
        elif ev.get("status") == "die":
            entry["end"] = ev["timeNano"] / 1e9
    return list(by_id.values())


def test_runs_triggered_at_once_queue_for_the_gpus_and_never_share_one(
    scheduler_stack, docker_client, trainer_image, mlflow_client
):
    cli, airflow_home = scheduler_stack
    name = "concurrent-runs"
    conf = {
        "dataset_path": str(SAMPLE_CHAT),
        "data_format": "chat",
        "registered_model_name": name,
        "runtime": "docker",
        "gpus": "auto",
        **FAST,
    }
    t0 = time.time()
    for _ in range(RUNS):
        cli("dags", "trigger", "loraflow_finetune", "-c", json.dumps(conf))

    deadline = time.monotonic() + 900
    while True:
        runs = json.loads(cli("dags", "list-runs", "loraflow_finetune", "-o", "json").strip().splitlines()[-1])
        states = [r["state"] for r in runs]
        if len(states) == RUNS and all(s in ("success", "failed") for s in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(5)
    assert states == ["success"] * RUNS, runs

    # Only this test's runs (the engine's event log holds every trainer-image container on the
    # host): one train and one evaluate container per run, each holding its leased GPU.
    ours = {r["run_id"] for r in runs}
    windows = [w for w in _train_windows(docker_client, t0, time.time()) if w["run"] in ours]
    assert sorted(w["task"] for w in windows) == ["evaluate"] * RUNS + ["train"] * RUNS, windows
    assert all("start" in w and "end" in w for w in windows), windows
    assert all(w["gpu"] in GPUS.split(",") for w in windows), windows
    for i, a in enumerate(windows):
        for b in windows[i + 1 :]:
            if a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (
                    f"two trainers on GPU {a['gpu']} at once: {windows}"
                )
    # At most two containers at a time (two GPUs), and the third run waited in the pool.
    events = sorted([(w["start"], 1) for w in windows] + [(w["end"], -1) for w in windows])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2, windows
    starts = sorted(_train_task_times(airflow_home), key=lambda t: t[0])
    assert starts[2][0] >= min(end for _, end in starts[:2]), f"the third train task did not wait for a slot: {starts}"
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == RUNS  # all three registered


def _train_task_times(airflow_home: Path) -> list[tuple[float, float]]:
    """(start, end) of each train task instance, read from the scheduled Airflow's DB."""
    import sqlite3
    from datetime import datetime

    with sqlite3.connect(airflow_home / "airflow.db") as db:
        rows = db.execute("select start_date, end_date from task_instance where task_id = 'train'").fetchall()
    return [(datetime.fromisoformat(s).timestamp(), datetime.fromisoformat(e).timestamp()) for s, e in rows]
