"""loraflow_finetune end to end: real Airflow (dag.test on a migrated DB), real MLflow over HTTP,
real training of the tiny model with the local runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.pipeline.conftest import conf

pytestmark = pytest.mark.slow


def versions(client, name):
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def aliases(client, name) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def test_good_run_registers_champion_then_worse_run_only_moves_challenger(run_dag, mlflow_client):
    name = "good-then-worse"
    state, tis, ws = run_dag(conf(name))
    assert state == "success", tis
    [v1] = versions(mlflow_client, name)
    assert aliases(mlflow_client, name) == {"champion": "1", "challenger": "1"}
    tags = v1.tags
    assert tags["loraflow.dag_id"] == "loraflow_finetune" and tags["loraflow.run_key"].startswith("loraflow_finetune/")
    assert len(tags["loraflow.data_fingerprint"]) == 64 and tags["loraflow.base_model"].endswith("tiny-llama")
    run = mlflow_client.get_run(v1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora_r"] == "16" and "eval_loss" in run.data.metrics
    assert run.data.metrics["final_train_loss"] < run.data.metrics["first_train_loss"]
    assert len(run.inputs.dataset_inputs) == 2  # train and eval splits as MLflow dataset inputs
    artifacts = {a.path for a in mlflow_client.list_artifacts(v1.run_id)}
    assert {"model", "data", "metrics.json", "metadata.json", "samples.jsonl"} <= artifacts
    assert (ws / "output" / "adapter" / "adapter_model.safetensors").exists()
    assert not (ws / "output" / "checkpoints").exists()  # scratch freed after registration

    # A worse run (one tiny step) becomes challenger; the champion stays.
    state, tis, _ = run_dag(conf(name, max_steps=1, learning_rate=1e-5))
    assert state == "success", tis
    assert [v.version for v in versions(mlflow_client, name)] == ["1", "2"]
    assert aliases(mlflow_client, name) == {"champion": "1", "challenger": "2"}


def test_scheduled_rerun_of_the_same_data_registers_nothing(dag, run_dag, mlflow_client, monkeypatch):
    name = "loraflow-model"  # the form's default: scheduled runs use the defaults
    state, tis, _ = run_dag({"max_steps": 3, "num_sample_generations": 0})
    assert state == "success", tis
    assert len(versions(mlflow_client, name)) == 1

    # dag.test() always creates a MANUAL run; the scheduler would create a SCHEDULED one.
    # Make dag.test() create the DagRun row the scheduler would (a real row in the metadata
    # DB); the tasks then see run_type=scheduled through their real context.
    import airflow.models.dagrun as dagrun_mod
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    def as_scheduled(*, dag, run_id, logical_date, data_interval, run_after, conf, triggered_by,
                     triggering_user_name, start_date, session):
        return dag.create_dagrun(
            run_id=run_id.replace("manual__", "scheduled__"), logical_date=run_after, data_interval=(run_after, run_after),
            run_after=run_after, conf=conf, run_type=DagRunType.SCHEDULED, state=DagRunState.RUNNING,
            triggered_by=triggered_by, triggering_user_name=None, start_date=start_date or run_after, session=session,
        )

    monkeypatch.setattr(dagrun_mod, "get_or_create_dagrun", as_scheduled)
    state, tis, _ = run_dag({"max_steps": 3, "num_sample_generations": 0})
    assert state == "success", tis
    assert tis["skip_if_registered"] == "success" and tis["train"] == "skipped" and tis["register"] == "skipped"
    assert tis["teardown"] == "success"
    assert len(versions(mlflow_client, name)) == 1


BAD_DATASETS = {
    "undecodable": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "undecodable_bytes"),
    "duplicates": (None, "duplicates"),
    "missing_column": (b'{"text": "hello"}\n' * 30, "missing_columns"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_dataset_fails_at_check_data_and_registers_nothing(run_dag, mlflow_client, data_dir, case):
    content, rule = BAD_DATASETS[case]
    path = data_dir / f"bad_{case}.jsonl"
    if content is None:
        rows = (REPO / "examples" / "data" / "sample_chat.jsonl").read_bytes().splitlines(keepends=True)
        content = b"".join(rows[:40] + rows[:5])
    path.write_bytes(content)
    name = f"bad-{case.replace('_', '-')}"
    state, tis, ws = run_dag(conf(name, dataset_path=str(path)))
    assert state == "failed"
    assert tis["check_data"] == "failed" and tis["train"] == "upstream_failed" and tis["register"] == "upstream_failed"
    report = json.loads((ws / "data_report.json").read_text())
    assert report["passed"] is False and rule in json.dumps(report)
    assert not mlflow_client.search_registered_models(f"name = '{name}'")


def test_failing_training_still_runs_teardown_and_marks_the_mlflow_run_failed(run_dag, mlflow_client, tiny_model):
    import shutil

    broken = tiny_model.parent / "broken-model"
    if not broken.exists():
        shutil.copytree(tiny_model, broken)
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    name = "broken-training"
    state, tis, ws = run_dag(conf(name, base_model=str(broken)))
    assert state == "failed"
    assert tis["train"] == "failed" and tis["register"] == "upstream_failed" and tis["teardown"] == "success"
    exp = mlflow_client.get_experiment_by_name(f"loraflow/{name}")
    [run] = mlflow_client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert not mlflow_client.search_registered_models(f"name = '{name}'")
    assert not (ws / "output" / "_SUCCESS").exists()


def test_invalid_trigger_params_are_rejected_before_anything_runs(dag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    bad = [{"lora_r": 0}, {"quantization": "3bit"}, {"learning_rate": -1}, {"max_seq_length": 4},
           {"registered_model_name": "../x"}, {"gpus": "all; rm -rf /"}, {"dp_target_epsilon": 0},
           {"runtime": "kubernetes"}, {"eval_fraction": 0.9}]
    for values in bad:
        params = ParamsDict(dag.params)
        with pytest.raises(ParamValidationError):
            params.update(values)
            params.validate()


def test_dagbag_imports_cleanly_without_the_training_stack():
    code = (
        "import sys; sys.path.insert(0, 'plugins')\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder='dags')\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "assert 'loraflow_finetune' in bag.dag_ids\n"
        "import loraflow.tasks, loraflow.registry, loraflow.checks, loraflow.operators\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'opacus') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY=\n" in out.stdout + "\n" and "HEAVY=" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
