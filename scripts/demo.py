"""`make demo`: run loraflow_finetune end to end on the embedded default.

Local Airflow metadata DB (sqlite), a local MLflow tracking server (sqlite backend, local
artifact store), the `local` runtime, the tiny CPU model built on the spot and the bundled
sample dataset. Ends by printing the registered version, its aliases and metrics, and where
the UIs are. `--serve-only` starts the Airflow and MLflow UIs; `--stop` stops them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("LORAFLOW_HOME", REPO / ".loraflow")).resolve()
MLFLOW_PORT = int(os.environ.get("LORAFLOW_DEMO_MLFLOW_PORT", "5000"))
AIRFLOW_PORT = int(os.environ.get("LORAFLOW_DEMO_AIRFLOW_PORT", "8080"))
SAMPLE = REPO / "examples" / "data" / "sample_chat.jsonl"
MODEL_NAME = "loraflow-demo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-only", action="store_true", help="start the Airflow and MLflow UIs and exit")
    parser.add_argument("--stop", action="store_true", help="stop the servers the demo started")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "plugins"))
    from loraflow import devstack

    stack = devstack.LocalStack(home=HOME, repo=REPO, mlflow_port=MLFLOW_PORT, airflow_port=AIRFLOW_PORT)
    if args.stop:
        stack.stop_all()
        print("stopped the demo's MLflow and Airflow servers")
        return 0

    stack.configure_airflow_env()
    print(f"[demo] MLflow tracking server on {stack.mlflow_uri} (sqlite + local artifacts under {stack.mlflow_dir})", flush=True)
    stack.start_mlflow(detach=True)
    if args.serve_only:
        stack.migrate_airflow_db()
        stack.start_airflow_ui()
        _print_uis(stack)
        return 0

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
    print(f"Airflow UI: http://localhost:{stack.airflow_port}   (`make ui` starts it; user/password in {stack.airflow_home}/simple_auth_manager_passwords.json.generated)")
    print(f"Load the model: mlflow.pyfunc.load_model('models:/{MODEL_NAME}@champion')  or  loraflow models show {MODEL_NAME}@champion")


if __name__ == "__main__":
    sys.exit(main())
