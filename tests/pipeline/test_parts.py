"""The pipeline's parts without a scheduler: trainer container settings, exit codes, path
confinement, the hash split and fingerprint, schedules from the environment, the local runtime."""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from loraflow import config
from loraflow.errors import ParamsError
from loraflow.gpus import GpuLease
from loraflow.operators import LoraflowTrainOperator
from loraflow.runtimes import TrainerFailed, TrainerRun, explain_exit
from loraflow.runtimes.docker import container_spec, device_requests
from loraflow.workspace import Pipeline, confine
from loraflow_trainer.errors import (
    EXIT_BAD_DATA,
    EXIT_BAD_SPEC,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_KILLED,
    EXIT_MEANINGS,
    EXIT_OUT_OF_MEMORY,
)
from tests.conftest import SAMPLE_CHAT


def _pipeline(ws: Path, **overrides) -> Pipeline:
    ws.mkdir(parents=True, exist_ok=True)
    values = dict(
        dag_id="loraflow_finetune",
        run_id="manual__2026-01-01T00:00:00+00:00",
        run_type="manual",
        workspace=str(ws),
        dataset_path=str(SAMPLE_CHAT),
        eval_fraction=0.1,
        min_rows=20,
        registered_model_name="m",
        promotion_metric="eval_loss",
        runtime="docker",
        gpus="all",
        memory_limit="",
        base_model_host=str(config.models_dir() / "tiny-llama"),
    )
    values.update(overrides)
    pipeline = Pipeline(**values)
    (ws / "pipeline.json").write_text(json.dumps(asdict(pipeline)))
    return pipeline


@pytest.mark.parametrize(
    ("ids", "expected"), [(None, {"Count": -1}), (["0", "2"], {"DeviceIDs": ["0", "2"]}), ([], None)]
)
def test_gpu_lease_becomes_docker_device_requests(ids, expected):
    requests = device_requests(GpuLease(ids))
    if expected is None:
        assert requests is None
        return
    [req] = requests
    assert req["Capabilities"] == [["gpu"]]
    for key, value in expected.items():
        assert req[key] == value


def test_trainer_container_gets_read_only_inputs_a_writable_output_and_the_run_labels(tmp_path):
    ws = config.runs_dir() / "loraflow_finetune" / "parts-container"
    pipeline = _pipeline(ws, gpus="1", shm_size="2g", memory_limit="3g")
    op = LoraflowTrainOperator(task_id="train", workspace=str(ws))
    spec = container_spec(TrainerRun(pipeline, op.entry, op.task_id), op.runtime("docker").settings, GpuLease(["1"]))
    mounts = {m["Target"]: m for m in spec.mounts}
    assert mounts["/workspace"]["Source"] == str(ws.resolve()) and mounts["/workspace"]["ReadOnly"] is True
    assert (
        mounts["/workspace/output"]["Source"] == str((ws / "output").resolve())
        and mounts["/workspace/output"]["ReadOnly"] is False
    )
    assert mounts["/models"]["Source"] == str(config.models_dir()) and mounts["/models"]["ReadOnly"] is True
    assert set(mounts) == {"/workspace", "/workspace/output", "/models"}  # no other host access
    assert spec.labels == {
        "loraflow.dag_id": "loraflow_finetune",
        "loraflow.run_id": pipeline.run_id,
        "loraflow.task_id": "train",
        "loraflow.gpu": "1",
    }
    assert spec.command == ["loraflow-train", "--job", "/workspace/job.json"]
    assert spec.device_requests[0]["DeviceIDs"] == ["1"]
    assert spec.network_mode == "none"  # a local base model needs no network
    assert spec.environment["HF_HUB_OFFLINE"] == "1"
    assert spec.shm_size == 2 * 1024**3 and spec.mem_limit == "3g"
    assert spec.user.split(":")[0] not in ("0", "root")


def test_exit_137_with_oomkilled_is_reported_as_out_of_memory():
    assert "out of memory" in explain_exit(EXIT_KILLED, oom_killed=True)
    assert explain_exit(EXIT_KILLED, oom_killed=False) == EXIT_MEANINGS[EXIT_KILLED]
    assert explain_exit(EXIT_BAD_DATA) == EXIT_MEANINGS[EXIT_BAD_DATA]
    assert "SIGKILL" in explain_exit(-9)


def _stand_in_trainer(tmp_path, monkeypatch, code: int) -> LoraflowTrainOperator:
    """A stand-in trainer process (a real subprocess) that prints and exits with ``code``, as the trainer does."""
    fake = tmp_path / "loraflow-train"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\nprint('step 1 loss 2.0', flush=True)\n"
        f"print('bad row', file=sys.stderr)\nsys.exit({code})\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LORAFLOW_TRAINER_BIN", str(fake))
    ws = tmp_path / "ws"
    _pipeline(ws, runtime="local")
    return LoraflowTrainOperator(task_id="train", workspace=str(ws))


def test_local_runtime_streams_the_trainer_and_names_its_exit_code(tmp_path, monkeypatch, capsys):
    from airflow.sdk.exceptions import AirflowFailException

    op = _stand_in_trainer(tmp_path, monkeypatch, EXIT_BAD_DATA)
    # Bad data fails the same way on every try: the task fails without spending its retries.
    with pytest.raises(AirflowFailException) as info:
        op.execute({})
    assert f"exit {EXIT_BAD_DATA}" in str(info.value) and EXIT_MEANINGS[EXIT_BAD_DATA] in str(info.value)
    assert "bad row" in str(info.value)  # the trainer's last line (stderr) says which row
    assert "step 1 loss 2.0" in capsys.readouterr().out  # streamed into the task log as it ran


@pytest.mark.parametrize(
    "code, retried",
    [
        (EXIT_INTERRUPTED, True),
        (EXIT_FAILURE, True),
        (EXIT_KILLED, True),
        (EXIT_OUT_OF_MEMORY, False),
        (EXIT_BAD_SPEC, False),
    ],
)
def test_only_failures_a_retry_can_fix_leave_the_task_its_retries(tmp_path, monkeypatch, code, retried):
    """Interrupted, killed or an unexpected error: the task's retry resumes (TrainerFailed, retried by
    Airflow); out of memory or a bad spec: AirflowFailException, the task fails at once."""
    from airflow.sdk.exceptions import AirflowFailException

    op = _stand_in_trainer(tmp_path, monkeypatch, code)
    with pytest.raises((TrainerFailed, AirflowFailException)) as info:
        op.execute({})
    assert isinstance(info.value, TrainerFailed) is retried, repr(info.value)
    assert isinstance(info.value, AirflowFailException) is not retried
    assert f"exit {code}" in str(info.value)


def test_dataset_paths_must_stay_inside_the_allowed_roots(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.jsonl").write_text("{}\n")
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside)
    assert confine("ok.jsonl", [root], "dataset_path") == root / "ok.jsonl"
    for bad in ("../secret.jsonl", str(outside), "link.jsonl", "file:///etc/passwd", "s3://bucket/x.jsonl"):
        with pytest.raises(ParamsError, match="dataset_path"):
            confine(bad, [root], "dataset_path")
    with pytest.raises(ParamsError, match="does not exist"):
        confine("missing.jsonl", [root], "dataset_path")


def _preprocess(tmp_path: Path, name: str, lines: list[str], **spec_overrides):
    from loraflow.data.preprocess import preprocess
    from loraflow_trainer import spec

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(lines))
    job = spec.from_flat(
        {
            "base_model": "tiny-llama",
            "data_format": "chat",
            "train_path": "data/train.parquet",
            "eval_path": "data/eval.parquet",
            **spec_overrides,
        }
    )
    ws = tmp_path / f"ws-{name}"
    result = preprocess(src, job, ws, 0.2)
    import pandas as pd

    return result, set(pd.read_parquet(ws / "data" / "eval.parquet")["messages"])


def test_split_and_fingerprint_depend_on_content_not_row_order(tmp_path):
    lines = SAMPLE_CHAT.read_text().splitlines(keepends=True)
    shuffled = lines[:]
    random.Random(7).shuffle(shuffled)
    a, eval_a = _preprocess(tmp_path, "a", lines)
    b, eval_b = _preprocess(tmp_path, "b", shuffled + lines[:3])  # reordered, with duplicates
    assert a.fingerprint == b.fingerprint and eval_a == eval_b and b.dropped_duplicates == 3
    assert 0 < a.eval_rows < a.train_rows
    c, _ = _preprocess(tmp_path, "c", lines, lora_r=4)  # same data, other settings
    d, _ = _preprocess(tmp_path, "d", lines[:-1])  # one row less
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_schedule_comes_from_the_environment(monkeypatch):
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from loraflow import schedule

    monkeypatch.delenv("LORAFLOW_SCHEDULE", raising=False)
    monkeypatch.delenv("LORAFLOW_DATASET_ASSET", raising=False)
    assert schedule.from_env() is None and schedule.param_defaults() == {}
    monkeypatch.setenv("LORAFLOW_SCHEDULE", "0 3 * * 0")
    assert isinstance(schedule.from_env(), CronTriggerTimetable)
    monkeypatch.setenv("LORAFLOW_DATASET_ASSET", "file:///data/new%20chat.jsonl")
    assert isinstance(schedule.from_env(), AssetOrTimeSchedule)
    assert schedule.param_defaults() == {"dataset_path": "/data/new chat.jsonl"}
    monkeypatch.delenv("LORAFLOW_SCHEDULE")
    asset = schedule.from_env()
    assert isinstance(asset, Asset) and asset.uri == "file:///data/new%20chat.jsonl"


def test_token_length_check_tokenizing_only_candidates_flags_the_same_rows_as_full_tokenization(
    tmp_path, tiny_model, monkeypatch
):
    """Rows whose UTF-8 length cannot exceed the limit are skipped; the verdict must not change."""
    from loraflow.data import checks

    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本語", "emoji😀", "x"]
    rows = [
        {
            "prompt": " ".join(rng.choices(words, k=rng.randint(1, 4))),
            "completion": " ".join(rng.choices(words, k=rng.randint(1, 4))),
        }
        for _ in range(400)
    ]
    rows[123] = {"prompt": " ".join(["gamma"] * 200), "completion": "ok"}  # far over: line 124
    rows[250] = {"prompt": "é" * 60, "completion": "日本語" * 3}  # many bytes per character: tokenized exactly
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def too_long(sample_rows: int):
        monkeypatch.setattr(checks, "SAMPLE_ROWS", sample_rows)
        with pytest.raises(Exception) as err:
            checks.check(
                path,
                "prompt_completion",
                max_seq_length=64,
                min_rows=1,
                tokenizer_json=tiny_model / "tokenizer.json",
                report_path=tmp_path / f"report-{sample_rows}.json",
            )
        report = json.loads((tmp_path / f"report-{sample_rows}.json").read_text())
        [rule] = [r for r in report["rules"] if r["rule"] == "too_long"]
        return rule, report["token_lengths"], str(err.value)

    full_rule, full_stats, full_message = too_long(10_000)
    fast_rule, fast_stats, message = too_long(50)
    assert checks.tokens_at_most_bytes(tiny_model / "tokenizer.json")
    assert fast_stats["rows_tokenized"] < 400 and "sample" in fast_stats["method"]  # the fast path ran
    assert full_stats["rows_tokenized"] == 400
    assert (
        124 in fast_rule["rows"] and fast_rule["count"] == full_rule["count"] and fast_rule["rows"] == full_rule["rows"]
    )
    assert fast_stats["max"] == full_stats["max"]
    assert message == full_message  # the same verdict, worded the same
    assert "too_long" in message and re.search(r"\b124\b", message), message  # names the rule and line 124


def test_token_length_fast_path_flags_a_row_one_token_over_and_multibyte_rows_by_their_bytes(
    tmp_path, tiny_model, monkeypatch
):
    """The byte-length shortcut must not let a too-long row through: a row exactly one token over
    max_seq_length and a row of few characters but many bytes (emoji: several tokens each) are
    reported with their line numbers; a row exactly at the limit is not."""
    from tokenizers import Tokenizer

    from loraflow.data import checks

    limit, overhead = 64, checks._OVERHEAD["prompt_completion"]
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731

    def with_tokens(n: int) -> str:  # a prompt that, with the completion "ok", is n tokens
        for k in range(1, 400):
            if count(" a" * k + "ok") == n:
                return " a" * k
        raise AssertionError(f"no prompt of {n} tokens")

    rows = [{"prompt": f"question {i}", "completion": "ok"} for i in range(300)]
    rows[40] = {"prompt": with_tokens(limit - overhead + 1), "completion": "ok"}  # line 41: limit + 1 tokens
    rows[90] = {"prompt": with_tokens(limit - overhead), "completion": "ok"}  # line 91: exactly the limit
    emoji = "😀" * 30  # 30 characters (under the limit), 120 bytes, more than 64 tokens
    assert len(emoji) + overhead <= limit < count(emoji + "ok") + overhead
    rows[200] = {"prompt": emoji, "completion": "ok"}  # line 201
    path = tmp_path / "edge.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    monkeypatch.setattr(checks, "SAMPLE_ROWS", 50)  # 300 rows > 50: the shortcut path, not full tokenization
    with pytest.raises(Exception) as err:
        checks.check(
            path,
            "prompt_completion",
            max_seq_length=limit,
            min_rows=1,
            tokenizer_json=tiny_model / "tokenizer.json",
            report_path=tmp_path / "report.json",
        )
    report = json.loads((tmp_path / "report.json").read_text())
    [rule] = [r for r in report["rules"] if r["rule"] == "too_long"]
    assert report["token_lengths"]["rows_tokenized"] < len(rows)  # rows were skipped, yet:
    assert rule["rows"] == [41, 201] and rule["count"] == 2
    assert report["token_lengths"]["max"] == count(emoji + "ok") + overhead
    assert "too_long" in str(err.value) and "41" in str(err.value)


def test_container_names_of_long_run_ids_and_their_trials_stay_apart_and_within_the_limit(tmp_path):
    """Two runs whose ids share a long prefix, and the trials of one sweep run: one container name each."""
    from loraflow.runtimes.docker import NAME_MAX, container_name
    from loraflow.workspace import run_dir

    prefix = "manual__" + "x" * 150
    names = set()
    for run_id in (prefix + "-a", prefix + "-b"):
        ws = run_dir("loraflow_sweep", run_id)
        for trial in ("", "trial-0", "trial-1"):
            pipeline = _pipeline(tmp_path / "p", run_id=run_id, workspace=str(ws / trial if trial else ws))
            names.add(container_name(pipeline))
    assert len(names) == 6, names
    assert all(len(n) <= NAME_MAX and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", n) for n in names), names
    short = _pipeline(tmp_path / "q", workspace=str(tmp_path / "runs" / "dag" / "run-1"))
    assert container_name(short) == "loraflow-dag-run-1"  # short names are kept readable as they are
