"""loraflow-train's exit codes: each user mistake exits with its documented code and a one-line cause."""

import json
import re
import signal
import subprocess
import sys

import pytest

from loraflow_trainer import errors


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "loraflow_trainer", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _cause(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loraflow-train: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_not_json_exits_bad_spec(tmp_path):
    (tmp_path / "job.json").write_text("{not json")
    proc = _run("--job", str(tmp_path / "job.json"))
    assert proc.returncode == errors.EXIT_BAD_SPEC and "not valid JSON" in _cause(proc)


def test_invalid_field_exits_bad_spec(tmp_path):
    (tmp_path / "job.json").write_text(
        json.dumps({"model": {"base_model": "m"}, "data": {"train_path": "t.jsonl"}, "lora": {"lora_r": -3}})
    )
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


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"question": "a", "answer": "b"}\n', "lacks column"),
        ("not json at all\n", "cannot be read"),
        ("", "no rows"),
        ('{"prompt": "a", "completion": " b"}\n{"prompt": null, "completion": " c"}\n', "row 1: column 'prompt'"),
    ],
    ids=["wrong-columns", "not-jsonl", "empty", "null-cell"],
)
def test_bad_dataset_exits_bad_data_before_loading_the_model(make_job, content, expected):
    job_path, _ = make_job()
    (job_path.parent / "train.jsonl").write_text(content)
    proc = _run("--job", str(job_path))
    assert proc.returncode == errors.EXIT_BAD_DATA and expected in _cause(proc)
    assert "HuggingFaceBackend" not in proc.stdout  # the backend (torch, the model) never started


def test_missing_model_exits_model_not_found(make_job, tmp_path):
    job_path, _ = make_job(model={"base_model": str(tmp_path / "no-such-model")})
    proc = _run("--job", str(job_path))
    assert proc.returncode == errors.EXIT_MODEL_NOT_FOUND and "base model" in _cause(proc)


STEP_LINE = re.compile(
    r"^step (\d+)/(\d+) \((\d+)%\)  loss (\d+\.\d{4})  lr \d\.\de-\d+  [\d,]+ tok/s  "
    r"eta \d+(m\d\ds)?s?$"
)


def _events(job_path, kind: str | None = None) -> list[dict]:
    lines = (job_path.parent / "output" / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


def test_progress_is_a_readable_line_per_step_and_the_json_events_go_to_a_file(make_job):
    job_path, _ = make_job(training={"max_steps": 3}, evaluation={"num_sample_generations": 0})
    proc = _run("--job", str(job_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and not [line for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = [STEP_LINE.match(line) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [m and (int(m[1]), int(m[2])) for m in steps] == [(1, 3), (2, 3), (3, 3)], proc.stdout
    assert steps[-1][3] == "100"
    # The same steps, with the full-precision numbers, for tools.
    logged = [e for e in _events(job_path, "log") if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    assert [f"{e['loss']:.4f}" for e in logged] == [m[4] for m in steps]
    assert all(e["tokens_per_second"] > 0 and e["time"] > 0 for e in logged)
    assert _events(job_path)[0]["event"] == "info" and _events(job_path)[-1]["event"] == "saved"
    # No library notices a user cannot act on (the optional CPU kernel, deprecations, MLflow's saving chatter).
    noise = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "gemm_4bit" in line or "FutureWarning" in line or "INFO mlflow" in line
    ]
    assert not noise, noise


def test_sigterm_checkpoints_exits_130_and_the_retry_resumes(make_job):
    job_path, job = make_job(training={"max_steps": 500, "save_steps": 1000}, evaluation={"num_sample_generations": 0})
    out = job_path.parent / "output"
    with (job_path.parent / "stderr.txt").open("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraflow_trainer", "--job", str(job_path)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        for line in proc.stdout:  # wait until training is really under way
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == errors.EXIT_INTERRUPTED
        err.seek(0)
        assert "interrupted" in _cause(subprocess.CompletedProcess([], proc.returncode, "", err.read()))
    assert "received SIGTERM: saving a checkpoint" in rest and not (out / "_SUCCESS").exists()
    assert _events(job_path, "signal")
    [checkpoint] = list((out / "checkpoints").glob("checkpoint-*"))
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 1 <= stopped_at < 500
    # The retry (given a short budget here to keep the test fast) continues after the checkpoint.
    retry = job.model_copy(update={"training": job.training.model_copy(update={"max_steps": stopped_at + 2})})
    retry.write(job_path)
    proc = _run("--job", str(job_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from checkpoint {checkpoint}" in proc.stdout
    events = _events(job_path)
    last_attempt = events[
        max(i for i, e in enumerate(events) if e["event"] == "info") :
    ]  # the file spans both attempts
    steps = [e["step"] for e in last_attempt if e["event"] == "log" and "loss" in e]
    assert steps == [stopped_at + 1, stopped_at + 2]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == stopped_at + 2
    assert (out / "_SUCCESS").exists()


def test_cli_module_imports_without_torch():
    # A bad spec must fail before torch loads (seconds, not tens of seconds, in the container).
    code = "import sys, loraflow_trainer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_make_tiny_model_is_deterministic(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."}) + "\n" for i in range(40))
    )
    for name in ("a", "b"):
        proc = _run("make-tiny-model", "--out", str(tmp_path / name), "--data", str(corpus), "--vocab-size", "300")
        assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.chat_template and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok("What is 1 plus 1?")["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize(
    "make_exc, code",
    [
        (
            lambda torch: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            errors.EXIT_OUT_OF_MEMORY,
        ),
        (
            lambda torch: RuntimeError("DefaultCPUAllocator: not enough memory: out of memory"),
            errors.EXIT_OUT_OF_MEMORY,
        ),
        (lambda torch: ValueError("something else broke"), errors.EXIT_FAILURE),
    ],
    ids=["cuda-oom", "cpu-oom", "other"],
)
def test_out_of_memory_maps_to_its_exit_code(make_exc, code):
    # Real torch exception objects: an actual OOM cannot be provoked safely on a shared CPU box.
    import torch

    from loraflow_trainer.cli import classify

    failure = classify(make_exc(torch))
    assert failure.exit_code == code and ("out of memory" in str(failure)) == (code == errors.EXIT_OUT_OF_MEMORY)
