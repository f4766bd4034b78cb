"""loraflow-train's exit codes: each user mistake exits with its documented code and a one-line cause."""

import json
import subprocess
import sys

import pytest

from loraflow_trainer import errors


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "loraflow_trainer", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _cause(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loraflow-train: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_not_json_exits_bad_spec(tmp_path):
    (tmp_path / "job.json").write_text("{not json")
    proc = _run("--job", str(tmp_path / "job.json"))
    assert proc.returncode == errors.EXIT_BAD_SPEC and "not valid JSON" in _cause(proc)


def test_invalid_field_exits_bad_spec(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"model": {"base_model": "m"}, "data": {"train_path": "t.jsonl"},
                                                   "lora": {"lora_r": -3}}))
    proc = _run("--job", str(tmp_path / "job.json"))
    assert proc.returncode == errors.EXIT_BAD_SPEC and "lora.lora_r" in _cause(proc)


def test_missing_job_file_exits_bad_spec(tmp_path):
    proc = _run("--job", str(tmp_path / "nope.json"))
    assert proc.returncode == errors.EXIT_BAD_SPEC and "does not exist" in _cause(proc)


def test_missing_dataset_exits_bad_data(make_job):
    job_path, job = make_job()
    (job_path.parent / "train.jsonl").unlink()
    proc = _run("--job", str(job_path))
    assert proc.returncode == errors.EXIT_BAD_DATA and "does not exist" in _cause(proc)


@pytest.mark.parametrize("content, expected", [
    ('{"question": "a", "answer": "b"}\n', "lacks column"),
    ("not json at all\n", "cannot be read"),
])
def test_bad_dataset_exits_bad_data(make_job, content, expected):
    job_path, _ = make_job()
    (job_path.parent / "train.jsonl").write_text(content)
    proc = _run("--job", str(job_path))
    assert proc.returncode == errors.EXIT_BAD_DATA and expected in _cause(proc)


def test_missing_model_exits_model_not_found(make_job, tmp_path):
    job_path, _ = make_job(model={"base_model": str(tmp_path / "no-such-model")})
    proc = _run("--job", str(job_path))
    assert proc.returncode == errors.EXIT_MODEL_NOT_FOUND and "base model" in _cause(proc)


def test_progress_is_one_json_line_per_event(make_job):
    job_path, _ = make_job(training={"max_steps": 2}, evaluation={"num_sample_generations": 0})
    proc = _run("--job", str(job_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout
    events = [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events.count("log") >= 2 and events[-1] == "saved"
