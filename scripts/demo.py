"""`make demo`: run loraflow_finetune end to end on the embedded default.

Local Airflow metadata DB (sqlite), a local MLflow tracking server (sqlite backend, local
artifact store), the `local` runtime, the tiny CPU model built on the spot and the bundled
sample dataset. Ends by printing the registered version, its aliases and metrics, and where
the UIs are. `--serve-only` (`make ui`) builds the tiny model the trigger form's defaults
name and starts the Airflow and MLflow UIs; `--stop` (`make stop`) stops the servers this
LORAFLOW_HOME started, and only those. Ports and the listen address are settings
(LORAFLOW_AIRFLOW_PORT, LORAFLOW_MLFLOW_PORT, LORAFLOW_AIRFLOW_LOG_PORT, LORAFLOW_BIND;
see devtools/loraflow_devstack.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("LORAFLOW_HOME", REPO / ".loraflow")).resolve()
SAMPLE = REPO / "examples" / "data" / "sample_chat.jsonl"
MODEL_NAME = "loraflow-demo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-only", action="store_true", help="start the Airflow and MLflow UIs and exit")
    parser.add_argument("--stop", action="store_true", help="stop the servers the demo started")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "plugins"))
    sys.path.insert(0, str(REPO / "devtools"))  # the local stack is dev tooling, not part of the loraflow package
    from loraflow.errors import LoraflowError
    from loraflow_devstack import LocalStack

    try:
        stack = LocalStack(home=HOME, repo=REPO)
        if args.stop:
            report = stack.stop_all()
            for line in report:
                print(f"[stop] {line}")
            if not report:
                print(f"[stop] no servers of this home ({HOME}) were running")
            return 0
        return serve(stack) if args.serve_only else demo(stack)
    except LoraflowError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2


def serve(stack) -> int:
    """`make ui`: MLflow, the tiny model the form's defaults name, and Airflow, in the background."""
    stack.configure_airflow_env()
    print(f"[ui] {stack.start_mlflow(detach=True)}", flush=True)
    stack.migrate_airflow_db()
    model_dir = stack.ensure_tiny_model(corpus=SAMPLE)
    print(f"[ui] tiny model (the trigger form's default base_model): {model_dir}", flush=True)
    for line in stack.start_airflow_ui():
        print(f"[ui] {line}", flush=True)
    _print_uis(stack)
    print('Trigger through the REST API: README.md, section "Trigger through the REST API".')
    return 0


def demo(stack) -> int:
    stack.configure_airflow_env()
    print(f"[demo] {stack.start_mlflow(detach=True)} (sqlite + local artifacts under {stack.mlflow_dir})", flush=True)

    print(f"[demo] Airflow metadata DB: {stack.airflow_home / 'airflow.db'}", flush=True)
    stack.migrate_airflow_db()
    model_dir = stack.ensure_tiny_model(corpus=SAMPLE)
    print(f"[demo] tiny model: {model_dir}", flush=True)

    conf = {
        "dataset_path": str(SAMPLE),
        "data_format": "chat",
        "base_model": str(model_dir),
        "registered_model_name": MODEL_NAME,
        "runtime": "local",
        "max_steps": 30,
        "learning_rate": 3e-3,
        "max_seq_length": 128,
    }
    print(f"[demo] triggering loraflow_finetune with {json.dumps(conf)}", flush=True)
    state = stack.run_dag("loraflow_finetune", conf)
    print(f"[demo] DAG run finished: {state}", flush=True)

    summary = stack.describe_model(MODEL_NAME)
    print()
    print(f"Registered model {MODEL_NAME!r}: version {summary['version']}")
    print(f"  aliases:   {', '.join(summary['aliases']) or '(none)'}")
    for key, value in sorted(summary["metrics"].items()):
        print(f"  {key:<22} {value:.6g}")
    print(f"  MLflow run: {summary['run_url']}")
    _print_uis(stack)
    return 0 if state == "success" else 1


def _print_uis(stack) -> None:
    print()
    print(f"MLflow UI:  {stack.mlflow_uri}   (running in the background; `make stop` stops it)")
    print(f"Airflow UI: {stack.airflow_url}   (`make ui` starts it; user admin, password in {stack.password_file})")
    if stack.bind != stack.connect_host:
        print(f"            listening on {stack.bind} (LORAFLOW_BIND): reachable from other machines")
    ref = f"{MODEL_NAME}@champion"
    print(f"Load the model: mlflow.pyfunc.load_model('models:/{ref}')  or  loraflow models show {ref}")


if __name__ == "__main__":
    sys.exit(main())
