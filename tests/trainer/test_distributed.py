"""One job on two processes (torchrun, gloo on CPU) trains what one process trains, writes one
set of outputs, fails as one run when a rank dies, and resumes on two processes.

Every test runs ``loraflow-train`` as a subprocess, as the container does; the two-process
runs are torchrun's real launch (standalone rendezvous, DDP through the HF Trainer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow_trainer import errors
from tests.trainer.conftest import toy_rows

pytestmark = pytest.mark.slow

# Same data, same seed, same effective batch (8): the losses of 1 and 2 processes agree to
# float32 rounding of the gloo all-reduce (measured: equal to 1e-5 over 6 steps).
LOSS_RTOL = 1e-4
ADAPTER_ATOL = 1e-5


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFLOW_GPUS", "LORAFLOW_GPUS_ON_CPU")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _train(job_path: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraflow_trainer", "--job", str(job_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
        cwd=job_path.parent,
    )


def _events(output: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (output / "events.jsonl").read_text().splitlines()) if e["event"] == kind]


def _losses(output: Path) -> list[float]:
    return [e["loss"] for e in _events(output, "log") if "loss" in e]


def _adapter(output: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def _job(make_job, tmp_path: Path, name: str, **training) -> Path:
    job_path, _ = make_job(
        rows=toy_rows(64), lora={"lora_dropout": 0.0}, training={"max_steps": 4, "save_steps": 2, **training}
    )
    target = tmp_path / name
    target.mkdir()
    for f in ("job.json", "train.jsonl", "eval.jsonl"):
        (job_path.parent / f).rename(target / f)
    return target / "job.json"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains_and_write_one_set_of_outputs(make_job, tmp_path, strategy):
    one = _job(make_job, tmp_path, "one", per_device_train_batch_size=8)
    two = _job(make_job, tmp_path, "two", per_device_train_batch_size=4, num_processes=2, distributed=strategy)
    p1, p2 = _train(one), _train(two)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    out1, out2 = one.parent / "output", two.parent / "output"

    launch = _events(out2, "launch")
    assert [(e["world_size"], e["strategy"]) for e in launch] == [(2, strategy)]
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 4
    assert l1[-1] < l1[0]  # it learned
    assert l2 == pytest.approx(l1, rel=LOSS_RTOL), (l1, l2)
    a1, a2 = _adapter(out1), _adapter(out2)
    assert a1.keys() == a2.keys()
    worst = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
    assert worst < ADAPTER_ATOL, worst
    assert any(float(a1[k].abs().max()) > 0 for k in a1 if "lora_B" in k)  # the adapter moved off its zero init

    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (out1, out2))
    assert (m1["effective_batch_size"], m1["device_count"]) == (8, 1)
    assert (m2["effective_batch_size"], m2["device_count"], m2["distributed"]) == (8, 2, strategy)
    assert m2["train_tokens"] == m1["train_tokens"]  # tokens counted over both ranks
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=LOSS_RTOL)

    # Rank 0 alone wrote: one marker, one sample per prompt, one "saved", nothing half-written.
    assert (out2 / "_SUCCESS").exists()
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in out1.iterdir())
    samples1, samples2 = ((o / "samples.jsonl").read_text().splitlines() for o in (out1, out2))
    assert len(samples2) == len(samples1)
    assert len(_events(out2, "saved")) == 1 and p2.stdout.count("saved the adapter") == 1


def _descendants(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids + [g for k in kids for g in _descendants(k)]


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def _interrupted(job: Path, at_line: str, act) -> tuple[subprocess.Popen, int]:
    """Run the job (in its own process group); on the first stdout line starting with ``at_line``
    call ``act(proc)``, then wait for the run to end. Returns the process and its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraflow_trainer", "--job", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=job.parent,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith(at_line):
                act(proc)
                break
        proc.stdout.read()
        return proc, proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_killed_rank_fails_the_run_with_its_cause_and_a_retry_resumes_on_two_processes(make_job, tmp_path):
    job = _job(make_job, tmp_path, "killed", per_device_train_batch_size=4, num_processes=2, max_steps=6)
    ranks: dict[str | None, int] = {}

    def kill_rank_1(proc):
        ranks.update({_rank_of(p): p for p in _descendants(proc.pid)})
        os.kill(ranks["1"], signal.SIGKILL)

    proc, code = _interrupted(job, "step 3/", kill_rank_1)  # checkpoint-2 is complete by step 3
    killed = ranks.get("1")
    stderr = proc.stderr.read()
    assert killed is not None, stderr[-3000:]
    assert code == errors.EXIT_KILLED, stderr[-3000:]
    causes = [line for line in stderr.splitlines() if line.startswith("loraflow-train: error: rank 1 of 2")]
    assert causes and "killed by SIGKILL" in causes[-1], stderr[-3000:]
    deadline = time.monotonic() + 30
    while _descendants(proc.pid) or any(_alive(p) for p in ranks.values()):
        assert time.monotonic() < deadline, "a rank outlived the failed run"
        time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the run's group is left
    out = job.parent / "output"
    assert not (out / "_SUCCESS").exists()
    # The kill lands at step 3 or, on a loaded machine, a step or two later: the retry must
    # resume from the newest checkpoint the killed run completed (checkpoint-2 at the least).
    done = [int(p.parent.name.rsplit("-", 1)[1]) for p in (out / "checkpoints").glob("checkpoint-*/trainer_state.json")]
    assert done and 2 <= max(done) < 6, done

    retry = _train(job)
    assert retry.returncode == 0, retry.stderr[-3000:]
    resumed = _events(out, "resume")
    assert resumed and resumed[-1]["checkpoint"].endswith(f"checkpoint-{max(done)}")
    assert _events(out, "launch")[-1]["world_size"] == 2
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
    assert (out / "_SUCCESS").exists()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "env, expected, code",
    [
        ({"LORAFLOW_GPUS": "7"}, "leased GPU(s) 7 but the trainer sees 0 CUDA device(s)", errors.EXIT_NO_GPU),
        (
            {"LORAFLOW_GPUS": "0,1", "LORAFLOW_GPUS_ON_CPU": "1", "DP": "1"},
            "DP-SGD trains on one process",
            errors.EXIT_BAD_SPEC,
        ),
    ],
    ids=["gpu-the-container-lacks", "dp-on-two-processes"],
)
def test_impossible_device_requests_are_refused_before_the_model_loads(make_job, env, expected, code):
    job_path, _ = make_job(**({"privacy": {"dp_enabled": True}} if env.pop("DP", None) else {}))
    proc = _train(job_path, timeout=120, **env)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "HuggingFaceBackend" not in proc.stdout  # refused before the backend started


def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint(make_job, tmp_path):
    """docker stop sends SIGTERM to the launcher; every rank checkpoints the same step and the run exits 130."""
    job = _job(
        make_job, tmp_path, "stopped", per_device_train_batch_size=4, num_processes=2, max_steps=40, save_steps=100
    )
    ranks: list[int] = []

    def stop(proc):
        ranks.extend(p for p in _descendants(proc.pid) if _rank_of(p) is not None)
        proc.send_signal(signal.SIGTERM)

    proc, code = _interrupted(job, "step 2/", stop)
    assert code == errors.EXIT_INTERRUPTED, proc.stderr.read()[-3000:]
    [checkpoint] = list((job.parent / "output" / "checkpoints").glob("checkpoint-*"))
    assert (checkpoint / "trainer_state.json").exists()
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert len(ranks) == 2 and not any(_alive(p) for p in ranks)
