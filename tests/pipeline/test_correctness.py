"""Correct under real use (issue 11): one run, one workspace; data that can train, refused
before the trainer starts when it cannot; chat stored as JSON text; a run's state that is
its tasks' verdict.

The dataset corpus goes through the real data check and preprocessing; what must reach
the trainer is proven by the fingerprint (the same examples, whatever the file looked
like). The DAG-level tests run the real DAG with dag.test() on the migrated DB.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from loraflow import config, workspace
from loraflow import data as dataset
from loraflow.data import checks
from loraflow.data.preprocess import preprocess
from loraflow.errors import DataCheckError, ParamsError
from loraflow_trainer import spec
from tests.conftest import SAMPLE_CHAT, SAMPLE_PC
from tests.pipeline.conftest import conf, load_dag, task_states

CHAT_ROWS = [json.loads(line) for line in SAMPLE_CHAT.read_text().splitlines()]


# --- One run, one workspace (point 1) ------------------------------------------------------------


def _prepare(run_id: str, **extra):
    return workspace.prepare(
        {"dataset_path": str(SAMPLE_CHAT), "base_model": "tiny-llama", "data_format": "chat", **extra},
        config.DAG_ID,
        run_id,
        "manual",
    )


@pytest.mark.parametrize(
    "pair",
    [
        ("manual__a:b", "manual__a_b"),
        ("manual__x+1", "manual__x_1"),
        ("m" * 200 + "-one", "m" * 200 + "-two"),
        ("run.", "run"),
        ("é", "_"),
    ],
)
def test_run_ids_that_fold_alike_get_their_own_workspaces(pair, tiny_model):
    a, b = (_prepare(run_id) for run_id in pair)
    assert a.workspace != b.workspace
    for pipeline, run_id in zip((a, b), pair, strict=True):
        ws = Path(pipeline.workspace)
        assert json.loads((ws / workspace.OWNER).read_text()) == {"dag_id": config.DAG_ID, "run_id": run_id}
        assert json.loads((ws / "job.json").read_text())["labels"]["run_id"] == run_id
        assert ws.parent.parent == config.runs_dir() and len(ws.name) <= 120


def test_a_workspace_that_belongs_to_another_run_is_refused_and_left_alone(tiny_model):
    ws = workspace.run_dir(config.DAG_ID, "manual__taken")
    ws.mkdir(parents=True, exist_ok=True)
    other = {"dag_id": config.DAG_ID, "run_id": "manual__someone-else"}
    (ws / workspace.OWNER).write_text(json.dumps(other))
    (ws / "job.json").write_text("theirs")
    with pytest.raises(ParamsError, match="belongs to another DAG run"):
        _prepare("manual__taken")
    assert (ws / "job.json").read_text() == "theirs" and json.loads((ws / workspace.OWNER).read_text()) == other


def test_a_retried_prepare_of_the_same_run_reuses_its_workspace(tiny_model):
    first = _prepare("manual__retried", lora_r=8)
    again = _prepare("manual__retried", lora_r=4)
    assert first.workspace == again.workspace
    assert workspace.load_job(again.workspace).lora.lora_r == 4


# --- Datasets: accepted and identical to the plain file, or refused before the trainer -----------


def _job(fmt: str, ef: float = 0.1, **training) -> spec.JobSpec:
    return spec.from_flat(
        {
            "base_model": "x",
            "train_path": "data/train.parquet",
            "data_format": fmt,
            "eval_path": "data/eval.parquet" if ef > 0 else None,
            **training,
        }
    )


def _check_and_preprocess(path: Path, fmt: str, tmp_path: Path, ef: float = 0.1, tokenizer=None, **training):
    job = _job(fmt, ef, **training)
    checks.check(path, fmt, max_seq_length=job.training.max_seq_length, min_rows=1, tokenizer_json=tokenizer)
    ws = tmp_path / f"ws-{path.name}"
    ws.mkdir()
    return preprocess(path, job, ws, ef), ws


def _messages_text(rows) -> list[str]:
    return [json.dumps(r["messages"]) for r in rows]


def _csv_quoted(cells: list[str], newline: bytes = b"\n") -> bytes:
    return b"messages" + newline + b"".join(b'"' + c.replace('"', '""').encode() + b'"' + newline for c in cells)


SAME_AS_SAMPLE = {
    "messages-as-json-in-csv": lambda p: pd.DataFrame({"messages": _messages_text(CHAT_ROWS)}).to_csv(p, index=False),
    "messages-as-json-in-parquet": lambda p: pd.DataFrame({"messages": _messages_text(CHAT_ROWS)}).to_parquet(p),
    "messages-as-list-in-parquet": lambda p: pd.DataFrame({"messages": [r["messages"] for r in CHAT_ROWS]}).to_parquet(
        p
    ),
    "bom-jsonl": lambda p: p.write_bytes(b"\xef\xbb\xbf" + SAMPLE_CHAT.read_bytes()),
    "crlf-jsonl": lambda p: p.write_bytes(SAMPLE_CHAT.read_bytes().replace(b"\n", b"\r\n")),
    "crlf-csv": lambda p: p.write_bytes(_csv_quoted(_messages_text(CHAT_ROWS), b"\r\n")),
    "bom-csv": lambda p: p.write_bytes(b"\xef\xbb\xbf" + _csv_quoted(_messages_text(CHAT_ROWS))),
    "upper-suffix": lambda p: p.write_bytes(SAMPLE_CHAT.read_bytes()),
}
SUFFIX = {
    "messages-as-json-in-csv": ".csv",
    "messages-as-json-in-parquet": ".parquet",
    "messages-as-list-in-parquet": ".parquet",
    "crlf-csv": ".csv",
    "bom-csv": ".csv",
    "upper-suffix": ".JSONL",
}


@pytest.mark.parametrize("case", sorted(SAME_AS_SAMPLE))
def test_the_same_chat_data_in_another_container_passes_and_gives_the_same_examples(case, tmp_path, tiny_model):
    """Nothing lost, nothing changed: the fingerprint hashes every normalised example."""
    path = tmp_path / f"{case}{SUFFIX.get(case, '.jsonl')}"
    SAME_AS_SAMPLE[case](path)
    tokenizer = tiny_model / "tokenizer.json"
    (tmp_path / "plain").mkdir()
    expected, _ = _check_and_preprocess(SAMPLE_CHAT, "chat", tmp_path / "plain", tokenizer=tokenizer)
    got, ws = _check_and_preprocess(path, "chat", tmp_path, tokenizer=tokenizer)
    assert (got.train_rows, got.eval_rows, got.fingerprint) == (
        expected.train_rows,
        expected.eval_rows,
        expected.fingerprint,
    )
    written = pd.read_parquet(ws / "data" / "train.parquet")["messages"].map(json.loads).tolist()
    assert all(isinstance(m, list) and m[-1]["role"] == "assistant" for m in written)


def _whitespace_variants(row: dict, n: int) -> list[dict]:
    """n rows that differ only in spacing (no two identical, so no duplicate rule fires)."""
    out = []
    for i in range(n):
        msgs = [dict(m) for m in row["messages"]]
        msgs[-1]["content"] = " " * (i % 10) + msgs[-1]["content"].replace(" ", " " * (1 + i // 10)) + "\t" * (i % 3)
        out.append({"messages": msgs})
    assert len({json.dumps(r) for r in out}) == n
    return out


def _row_on_side(eval_side: bool, ef: float) -> dict:
    for row in CHAT_ROWS:
        bucket = dataset.split_bucket(dataset.normalised_keys(pd.DataFrame({"messages": [row["messages"]]}), "chat"))[0]
        if (bucket < ef) == eval_side:
            return row
    raise AssertionError("no sample row on that side of the split")


@pytest.mark.parametrize(("side", "rule"), [(True, "train_split_empty"), (False, "eval_split_empty")])
def test_rows_that_differ_only_in_whitespace_are_refused_before_training(side, rule, tmp_path):
    """They pass the data check (no two are identical) but the split keeps them together:
    all in eval leaves nothing to train, all in train leaves an eval file the trainer refuses."""
    ef = 0.5
    path = tmp_path / "variants.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _whitespace_variants(_row_on_side(side, ef), 200)))
    job = _job("chat", ef)
    checks.check(path, "chat", max_seq_length=512, min_rows=20, tokenizer_json=None)  # passes: every row is different
    with pytest.raises(DataCheckError) as err:
        preprocess(path, job, tmp_path, ef)
    assert rule in str(err.value) and "200 row(s) hold only 1 distinct content" in str(err.value), str(err.value)
    assert not (tmp_path / "data" / "train.parquet").exists() and not (tmp_path / "fingerprint.json").exists()


def test_a_train_split_smaller_than_one_batch_is_refused(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS[:12]))
    with pytest.raises(DataCheckError, match="train_split_too_small.*per_device_train_batch_size=32"):
        preprocess(path, _job("chat", 0.0, per_device_train_batch_size=32), tmp_path, 0.0)
    result = preprocess(path, _job("chat", 0.0, per_device_train_batch_size=12), tmp_path, 0.0)
    assert result.train_rows == 12


def test_an_eval_file_with_no_rows_left_is_refused(tmp_path):
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.csv"
    train.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS[:40]))
    ev.write_text("messages\n")
    with pytest.raises(DataCheckError, match="empty_dataset"):
        checks.check(train, "chat", max_seq_length=512, min_rows=1, tokenizer_json=None, eval_path=ev)
    with pytest.raises(DataCheckError, match="eval_split_empty.*eval.csv"):
        preprocess(train, _job("chat", 0.1), tmp_path, 0.1, ev)


REFUSED_DATASETS = {
    "empty-file": (b"", "chat", "empty_dataset"),
    "only-blank-lines": (b"\n   \n\t\n", "chat", "empty_dataset"),
    "csv-header-only": (b"messages\n", "chat", "empty_dataset"),
    "column-the-spec-names-is-missing": (
        b'{"prompt": "a", "answer": "b"}\n' * 30,
        "prompt_completion",
        "missing_columns",
    ),
    "numbers-as-text": (b"".join(b'{"text": %d}\n' % i for i in range(30)), "text", "column 'text' holds int64"),
    "mixed-types": (
        b"".join((b'{"text": %d}\n' % i) if i % 2 else (b'{"text": "row %d"}\n' % i) for i in range(30)),
        "text",
        "column 'text' holds int values",
    ),
    "messages-json-not-a-list": (
        _csv_quoted(['{"role": "user"}'] * 3 + _messages_text(CHAT_ROWS[:30])),
        "chat",
        "malformed_messages",
    ),
    "messages-not-json": (_csv_quoted(["not json"] + _messages_text(CHAT_ROWS[:30])), "chat", "malformed_messages"),
    "whitespace-only-completion": (
        b"".join(b'{"prompt": "q%d", "completion": "\\u00a0\\t"}\n' % i for i in range(30)),
        "prompt_completion",
        "blank_text",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_DATASETS))
def test_data_that_cannot_train_is_refused_by_the_check_naming_the_cause(case, tmp_path):
    content, fmt, says = REFUSED_DATASETS[case]
    path = tmp_path / (f"{case}.csv" if content.startswith(b"messages") else f"{case}.jsonl")
    path.write_bytes(content)
    with pytest.raises(DataCheckError) as err:
        checks.check(
            path, fmt, max_seq_length=512, min_rows=1, tokenizer_json=None, report_path=tmp_path / "report.json"
        )
    assert says in str(err.value), str(err.value)
    assert "store these columns as strings" not in str(err.value)
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


# --- Through the DAG (dag.test on the migrated DB) ------------------------------------------------


@pytest.mark.slow
def test_a_trigger_conf_with_names_outside_the_form_fails_at_prepare(dag):
    """Airflow merges a trigger conf into the params, unknown names included: prepare sees them."""
    dr = load_dag().test(
        run_conf={**conf("conf-outside-form"), "trust_remote_code": True, "prompt_column": "q", "foo": 1}
    )
    tis = task_states(dr)
    assert dr.state == "failed", tis
    assert tis["prepare"] == "failed" and tis["train"] == "upstream_failed" and tis["outcome"] == "failed", tis
    assert not workspace.run_dir(dr.dag_id, dr.run_id).exists()


@pytest.mark.slow
def test_whitespace_variants_fail_at_preprocess_and_never_reach_the_trainer(run_dag, data_dir, mlflow_client):
    path = data_dir / "whitespace_variants.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _whitespace_variants(_row_on_side(True, 0.1), 200)))
    name = "whitespace-variants"
    state, tis, ws = run_dag(conf(name, dataset_path=str(path)))
    assert state == "failed", tis
    assert tis["check_data"] == "success" and tis["preprocess"] == "failed" and tis["train"] == "upstream_failed", tis
    assert not (ws / "output").exists() and not (ws / "data" / "train.parquet").exists()
    assert not mlflow_client.search_registered_models(f"name = '{name}'")


@pytest.mark.slow
def test_chat_stored_as_json_text_in_csv_trains_and_registers(run_dag, data_dir, mlflow_client):
    path = data_dir / "chat_as_json.CSV"
    pd.DataFrame({"messages": _messages_text(CHAT_ROWS)}).to_csv(path, index=False)
    name = "chat-json-csv"
    state, tis, ws = run_dag(conf(name, dataset_path=str(path), max_steps=2))
    assert state == "success", tis
    assert json.loads((ws / "data_report.json").read_text())["passed"] is True
    assert [v.version for v in mlflow_client.search_model_versions(f"name = '{name}'")] == ["1"]


@pytest.mark.slow
def test_train_marked_failed_by_an_operator_fails_the_dag_run_though_teardown_succeeds(
    run_dag, monkeypatch, mlflow_client
):
    """An operator marks train failed (Airflow's own set_task_instance_state, what the REST
    PATCH calls) while register runs: register and teardown succeed, the run must not."""
    from airflow.models.dagbag import DBDagBag
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    from loraflow import tasks

    real_register = tasks.register

    def register_while_train_is_marked_failed(ws, train_result, context):
        with create_session() as session:
            dag = DBDagBag().get_latest_version_of_dag(config.DAG_ID, session=session)
            dag.set_task_instance_state(
                task_id="train", run_id=context["dag_run"].run_id, state=TaskInstanceState.FAILED, session=session
            )
        return real_register(ws, train_result, context)

    monkeypatch.setattr(tasks, "register", register_while_train_is_marked_failed)
    state, tis, _ = run_dag(conf("marked-failed", max_steps=2))
    assert tis["train"] == "failed" and tis["register"] == "success" and tis["teardown"] == "success", tis
    assert tis["outcome"] == "failed" and state == "failed", tis


@pytest.mark.slow
def test_a_good_run_still_ends_success_with_the_outcome_task(run_dag):
    state, tis, _ = run_dag(
        conf("outcome-good", dataset_path=str(SAMPLE_PC), data_format="prompt_completion", max_steps=2)
    )
    assert state == "success" and tis["outcome"] == "success", tis
