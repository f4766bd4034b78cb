"""Pipeline overhead: wall time of a whole loraflow_finetune DAG run minus the time spent training.

Starts the embedded local stack (MLflow server, migrated sqlite Airflow DB, tiny model)
in a scratch LORAFLOW_HOME, runs the DAG once with ``dag.test()`` (LocalStack.run_dag)
on the bundled sample chat data, and subtracts the trainer's own ``train_runtime_s``
(metrics.json) from the wall time. The per-task durations come from the Airflow DB, so
the table shows where the overhead goes. With a Docker engine and the image
``loraflow-trainer:0.1.0`` present, the same is measured for runtime=docker. The
servers it starts are stopped at the end.

    python bench/pipeline_overhead.py
    python bench/pipeline_overhead.py --smoke      # 2 training steps, local runtime only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SAMPLE = common.REPO / "examples" / "data" / "sample_chat.jsonl"
IMAGE = os.environ.get("LORAFLOW_IMAGE", "loraflow-trainer:0.1.0")
DAG_ID = "loraflow_finetune"


def docker_image_present() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0


def _db_times(db: Path, run_id: str) -> tuple[float | None, dict[str, float]]:
    con = sqlite3.connect(db)
    try:

        def seconds(a, b):
            from datetime import datetime

            return (
                (datetime.fromisoformat(str(b)) - datetime.fromisoformat(str(a))).total_seconds() if a and b else None
            )

        start, end = con.execute(
            "select start_date, end_date from dag_run where dag_id=? and run_id=?", (DAG_ID, run_id)
        ).fetchone()
        tasks = {
            t: seconds(s, e)
            for t, s, e in con.execute(
                "select task_id, start_date, end_date from task_instance "
                "where dag_id=? and run_id=? order by start_date",
                (DAG_ID, run_id),
            )
        }
        return seconds(start, end), tasks
    finally:
        con.close()


def run_once(stack, runtime: str, max_steps: int, model_dir: Path) -> dict:
    conf = {
        "dataset_path": str(SAMPLE),
        "data_format": "chat",
        "base_model": str(model_dir),
        "registered_model_name": f"bench-overhead-{runtime}",
        "runtime": runtime,
        "max_steps": max_steps,
        "learning_rate": 3e-3,
        "max_seq_length": 128,
    }
    if runtime == "docker":
        conf["gpus"] = "none"
    before = set((stack.home / "runs" / DAG_ID).glob("*")) if (stack.home / "runs" / DAG_ID).exists() else set()
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        state = stack.run_dag(DAG_ID, conf)
    wall = time.perf_counter() - t0
    new = sorted(set((stack.home / "runs" / DAG_ID).glob("*")) - before)
    if state != "success" or not new:
        print(log.getvalue()[-6000:], file=sys.stderr)
        raise SystemExit(f"the {runtime} DAG run ended {state}; see the log above")
    ws = new[-1]
    metrics = json.loads((ws / "output" / "metrics.json").read_text())
    run_id = json.loads((ws / "pipeline.json").read_text())["run_id"] if (ws / "pipeline.json").exists() else None
    if run_id is None:
        con = sqlite3.connect(stack.airflow_home / "airflow.db")
        run_id = con.execute(
            "select run_id from dag_run where dag_id=? order by start_date desc limit 1", (DAG_ID,)
        ).fetchone()[0]
        con.close()
    dagrun_s, tasks = _db_times(stack.airflow_home / "airflow.db", run_id)
    train_s = float(metrics["train_runtime_s"])
    return {
        "runtime": runtime,
        "state": state,
        "max_steps": max_steps,
        "wall_s": wall,
        "dagrun_s": dagrun_s,
        "train_runtime_s": train_s,
        "overhead_s": wall - train_s,
        "overhead_in_dagrun_s": (dagrun_s - train_s) if dagrun_s else None,
        "train_task_minus_training_s": (tasks.get("train") or 0) - train_s,
        "tasks_s": tasks,
        "load_average": common.load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--runtimes", nargs="+", default=["local", "docker"], choices=["local", "docker"])
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.max_steps, a.runtimes = 2, ["local"]
    sys.path.insert(0, str(common.REPO / "plugins"))
    sys.path.insert(0, str(common.REPO / "devtools"))
    from loraflow_devstack import LocalStack, free_port

    home = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    os.environ["LORAFLOW_MODELS"] = str(home / "models")
    os.environ["LORAFLOW_DATA_ROOTS"] = str(common.REPO / "examples")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    stack = LocalStack(home=home, repo=common.REPO, mlflow_port=free_port(), airflow_port=free_port())
    stack.configure_airflow_env()
    info = common.machine()
    results, skipped = [], {}
    try:
        t = time.perf_counter()
        stack.start_mlflow()
        stack.migrate_airflow_db()
        model_dir = stack.ensure_tiny_model(corpus=SAMPLE)
        print(f"  stack ready in {time.perf_counter() - t:.0f}s (MLflow {stack.mlflow_uri}, home {home})", flush=True)
        for runtime in a.runtimes:
            if runtime == "docker" and not docker_image_present():
                skipped["docker"] = f"no Docker engine or no image {IMAGE}"
                print(f"  docker runtime skipped: {skipped['docker']}")
                continue
            res = run_once(stack, runtime, a.max_steps, model_dir)
            results.append(res)
            tasks = json.dumps({k: round(v or 0, 1) for k, v in res["tasks_s"].items()})
            print(
                f"  {runtime:<7} wall {res['wall_s']:.1f}s  training {res['train_runtime_s']:.1f}s  "
                f"overhead {res['overhead_s']:.1f}s  tasks {tasks}",
                flush=True,
            )
    finally:
        stack.stop_all()
        shutil.rmtree(home, ignore_errors=True)
    cols = [
        "runtime",
        "max_steps",
        "wall_s",
        "dagrun_s",
        "train_runtime_s",
        "overhead_s",
        "overhead_in_dagrun_s",
        "train_task_minus_training_s",
    ]
    print()
    print(common.table(results, cols))
    info["load_average_end"] = common.load_average()
    common.write_result(
        "pipeline_overhead",
        {"machine": info, "smoke": a.smoke, "goal": {"overhead_s_local": 20}, "results": results, "skipped": skipped},
        a.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
