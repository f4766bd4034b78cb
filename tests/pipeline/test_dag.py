"""loraflow_finetune end to end: real Airflow (dag.test on a migrated DB), real MLflow over HTTP,
real training of the tiny model with the local runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE_CHAT, SAMPLE_PC
from tests.pipeline.conftest import conf, load_dag, try_numbers
from tests.pipeline.flaky_proxy import FlakyProxy

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

    def as_scheduled(
        *,
        dag,
        run_id,
        logical_date,
        data_interval,
        run_after,
        conf,
        triggered_by,
        triggering_user_name,
        start_date,
        session,
    ):
        return dag.create_dagrun(
            run_id=run_id.replace("manual__", "scheduled__"),
            logical_date=run_after,
            data_interval=(run_after, run_after),
            run_after=run_after,
            conf=conf,
            run_type=DagRunType.SCHEDULED,
            state=DagRunState.RUNNING,
            triggered_by=triggered_by,
            triggering_user_name=None,
            start_date=start_date or run_after,
            session=session,
        )

    monkeypatch.setattr(dagrun_mod, "get_or_create_dagrun", as_scheduled)
    state, tis, _ = run_dag({"max_steps": 3, "num_sample_generations": 0})
    assert state == "success", tis
    assert tis["skip_if_registered"] == "success" and tis["train"] == "skipped" and tis["register"] == "skipped"
    assert tis["teardown"] == "success"
    assert len(versions(mlflow_client, name)) == 1


def _sample_lines(path, n):
    return path.read_bytes().splitlines(keepends=True)[:n]


def _chat_row(user: str, assistant: str) -> bytes:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return (json.dumps({"messages": messages}) + "\n").encode()


# case -> (what the dataset file holds, its format, the rule the check must name, extra conf)
BAD_DATASETS = {
    "undecodable": (
        lambda: b"".join(_sample_lines(SAMPLE_CHAT, 30)) + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
        "chat",
        "line 31",
        {},
    ),
    "duplicates": (
        lambda: b"".join(_sample_lines(SAMPLE_CHAT, 40) + _sample_lines(SAMPLE_CHAT, 5)),
        "chat",
        "duplicates",
        {},
    ),
    "missing_column": (lambda: b'{"text": "hello"}\n' * 30, "chat", "missing_columns", {}),
    "too_few_rows": (lambda: b"".join(_sample_lines(SAMPLE_CHAT, 5)), "chat", "min_rows", {}),
    "too_long": (
        lambda: b"".join(_sample_lines(SAMPLE_CHAT, 30)) + _chat_row("tell me everything", "blah " * 600),
        "chat",
        "too_long",
        {},
    ),
    "blank_completion": (
        lambda: b"".join(_sample_lines(SAMPLE_PC, 30)) + b'{"prompt": "say hi", "completion": "   "}\n',
        "prompt_completion",
        "blank_text",
        {},
    ),
    "null_prompt": (
        lambda: b"".join(_sample_lines(SAMPLE_PC, 30)) + b'{"prompt": null, "completion": "hi"}\n',
        "prompt_completion",
        "null_text",
        {},
    ),
    "train_eval_leakage": (
        lambda: b"".join(_sample_lines(SAMPLE_CHAT, 60)),
        "chat",
        "train_eval_leakage",
        {"eval_dataset_path": "LEAKY_EVAL"},
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_dataset_fails_at_check_data_and_registers_nothing(run_dag, mlflow_client, data_dir, case):
    content, fmt, rule, extra = BAD_DATASETS[case]
    path = data_dir / f"bad_{case}.jsonl"
    path.write_bytes(content())
    if extra.get("eval_dataset_path") == "LEAKY_EVAL":
        # held-out rows plus two training rows with different case/spacing: still a leak
        leaky = data_dir / "leaky_eval.jsonl"
        rows = [json.loads(line) for line in _sample_lines(SAMPLE_CHAT, 80)]
        for row in rows[:2]:
            row["messages"][0]["content"] = "  " + row["messages"][0]["content"].upper()
        leaky.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[60:80]))
        extra = {"eval_dataset_path": str(leaky)}
    name = f"bad-{case.replace('_', '-')}"
    state, tis, ws = run_dag(conf(name, dataset_path=str(path), data_format=fmt, **extra))
    assert state == "failed"
    assert tis["check_data"] == "failed" and tis["train"] == "upstream_failed" and tis["register"] == "upstream_failed"
    assert tis["teardown"] == "success"
    report = json.loads((ws / "data_report.json").read_text())
    assert report["passed"] is False and rule in json.dumps(report)
    assert not (ws / "data" / "train.parquet").exists()  # stopped before preprocessing, long before training
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


INVALID_PARAMS = [
    {"lora_r": 0},
    {"quantization": "3bit"},
    {"learning_rate": -1},
    {"max_seq_length": 4},
    {"registered_model_name": "../x"},
    {"gpus": "all; rm -rf /"},
    {"dp_target_epsilon": 0},
    {"runtime": "kubernetes"},
    {"eval_fraction": 0.9},
    {"max_steps": "ten"},
    {"data_format": "xml"},
]


def test_invalid_trigger_params_are_rejected_before_a_run_exists(dag, airflow_db):
    """The same validation the UI form and the REST trigger go through: no DAG run is created."""
    from airflow.models.dagrun import DagRun
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    def runs() -> int:
        with create_session() as session:
            return session.scalar(select(func.count()).select_from(DagRun).where(DagRun.dag_id == dag.dag_id))

    before = runs()
    for values in INVALID_PARAMS:
        with pytest.raises(ParamValidationError):
            load_dag().test(run_conf=values)
    assert runs() == before


def test_trigger_form_has_typed_sectioned_params_named_like_the_job_spec(dag):
    from loraflow_trainer import spec

    flat = spec.from_flat({"base_model": "x", "train_path": "t.parquet"}).flat_params()
    form = {name: dag.params.get_param(name) for name in dag.params}
    for name in (
        "base_model",
        "data_format",
        "lora_r",
        "lora_alpha",
        "quantization",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "max_seq_length",
        "dp_enabled",
        "dp_target_epsilon",
    ):
        assert name in flat, name  # one name for one thing: the Param is the job spec field
    for name in (
        "dataset_path",
        "registered_model_name",
        "promotion_metric",
        "runtime",
        "gpus",
        "base_model",
        "lora_r",
        "quantization",
        "learning_rate",
        "dp_enabled",
        "dp_target_epsilon",
    ):
        p = form[name]
        assert p.schema.get("type") and p.schema.get("title") and p.description and p.schema.get("section"), name
    assert set(form["quantization"].schema["enum"]) >= {"none", "4bit", "8bit"}
    rank = spec.json_schema()["$defs"]["LoraSpec"]["properties"]["lora_r"]
    # The job spec's bounds, under allOf: the form must not clamp a typed value.
    assert form["lora_r"].schema["allOf"] == [{"minimum": rank["minimum"], "maximum": rank["maximum"]}]
    assert "minimum" not in form["lora_r"].schema and "maximum" not in form["lora_r"].schema
    assert "1 to 1,024" in form["lora_r"].description  # the range is stated where the person types
    sections = [form[name].schema["section"] for name in dag.params]
    assert list(dict.fromkeys(sections)) == [
        "Data",
        "Model",
        "LoRA",
        "Training",
        "Privacy",
        "Evaluation",
        "Registry",
        "Runtime",
    ]
    # Every default is valid as the form opens: nothing required is empty, dropdowns name their default.
    for name in dag.params:
        p = form[name]
        assert p.value is not None or "null" in p.schema["type"], name
        assert p.value != "" or p.schema.get("minLength", 0) == 0, name
    assert form["runtime"].schema["values_display"]["null"].startswith("deployment default")


def test_each_setting_is_described_once_in_its_field_and_the_form_docs_and_cli_read_that_text(dag):
    from loraflow import params
    from loraflow_trainer import spec

    fields = {
        **{
            n: f
            for m in (spec.ModelSpec, spec.DataSpec, spec.LoraSpec, spec.TrainingSpec, spec.PrivacySpec, spec.EvalSpec)
            for n, f in m.model_fields.items()
        },
        **params.PipelineSettings.model_fields,
    }
    cli = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "params", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    listed = {row["name"]: row for row in json.loads(cli.stdout)}
    assert list(listed) == list(dag.params)
    for name in dag.params:
        field, param = fields[name], dag.params.get_param(name)
        assert param.schema["title"] == field.title, name
        described = " ".join(field.description.split())  # the field's docstring, on one line
        assert param.description.startswith(described.rstrip(".")), name  # plus the range, where it has one
        assert listed[name]["description"] == param.description and listed[name]["title"] == field.title, name
        assert f"- `{name}` ({field.title};" in dag.doc_md and param.description in dag.doc_md, name


def test_dagbag_imports_cleanly_without_the_training_stack():
    code = (
        "import sys; sys.path.insert(0, 'plugins')\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder='dags')\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "assert 'loraflow_finetune' in bag.dag_ids\n"
        "import loraflow.tasks, loraflow.registry, loraflow.data.checks, loraflow.operators\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'opacus') if m in sys.modules]\n"
        "print('SPEC=' + sys.modules['loraflow_trainer.spec'].__file__)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The DAG read the trainer's job spec (the form is built from it) and still pulled in no training stack.
    *_, spec_line, heavy_line = out.stdout.strip().splitlines()
    assert spec_line.endswith("loraflow_trainer/spec.py"), out.stdout
    assert heavy_line == "HEAVY="


def test_register_retried_after_mlflow_went_down_registers_exactly_once(
    run_dag, mlflow_server, mlflow_client, monkeypatch
):
    """MLflow is down when register starts, then dies again right after it committed the new
    version: the retries register the outputs left on disk, and only one version exists."""
    name = "flaky-registry"
    with FlakyProxy(mlflow_server) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        proxy.refuse_next("experiments/get-by-name")
        proxy.drop_after("model-versions/create")
        state, tis, ws = run_dag(conf(name, max_steps=4))
    assert proxy.refused == 1 and proxy.dropped  # both faults really happened
    assert state == "success", tis
    from loraflow.workspace import Pipeline

    assert try_numbers(Pipeline.load(ws).run_id)["register"] == 3
    [v1] = versions(mlflow_client, name)
    assert aliases(mlflow_client, name) == {"champion": v1.version, "challenger": v1.version}
    assert mlflow_client.get_run(v1.run_id).info.status == "FINISHED"
    assert (ws / "output" / "_SUCCESS").exists()
    # The loss curve went to MLflow once through the retries: one point per step.
    assert sorted(m.step for m in mlflow_client.get_metric_history(v1.run_id, "loss")) == [1, 2, 3, 4]


def test_an_unreachable_mlflow_is_a_retryable_error_that_names_the_fix():
    from loraflow import registry
    from loraflow.errors import RegistryUnavailable
    from loraflow_devstack import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    retryable = "unreachable.*the task retries, outputs stay in the workspace"
    with pytest.raises(RegistryUnavailable, match=retryable) as info:
        registry.is_registered(uri, "any-model", "0" * 64)
    assert info.value.retryable
