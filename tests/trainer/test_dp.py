"""DP-SGD accounting that survives stops, retries and budget changes (real training of the tiny model).

The trainer's epsilon (Opacus' RDP accountant) is checked against two accountants that are
not the trainer's: ``independent_epsilon`` below integrates the Rényi divergence of the
Poisson-subsampled Gaussian numerically (no Opacus code), and Opacus' PRV accountant
(numerical composition of privacy random variables, a different method that gives a
tighter, lower figure than any RDP bound). What a run did is recorded by instrumenting
the sampler (every batch drawn) and the optimizer (the noise multiplier of every step),
not read from the run's own accounting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer
from safetensors.torch import load_file

from loraflow_trainer import dp, spec
from loraflow_trainer.backend import HuggingFaceBackend
from loraflow_trainer.errors import EXIT_BAD_SPEC, JobSpecError
from tests.trainer.conftest import toy_rows

pytestmark = pytest.mark.slow

N_TRAIN, BATCH = 48, 8  # q = 1/6: an "epoch" is 6 steps, so steps 7-12 are the second one
Q = BATCH / N_TRAIN
DELTA = 1 / N_TRAIN**1.1

# -- an accountant that is not the trainer's -------------------------------------------

ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


def _log_moment(sigma: float, q: float, alpha: float) -> float:
    """log E_{z~N(0,s^2)}[((1-q) + q e^{(2z-1)/(2s^2)})^alpha]: the Rényi moment of the Poisson-
    subsampled Gaussian (Mironov et al. 2019), by the trapezoid rule in log space."""
    z = np.linspace(-14 * sigma - 2, alpha + 14 * sigma + 2, 20_001)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_f = -(z**2) / (2 * sigma**2) - 0.5 * np.log(2 * np.pi * sigma**2) + alpha * log_ratio
    top = log_f.max()
    w = np.exp(log_f - top)
    w[0] *= 0.5
    w[-1] *= 0.5
    return float(top + np.log(w.sum() * (z[1] - z[0])))


def independent_epsilon(segments, delta: float) -> float:
    """Epsilon at delta of (noise_multiplier, sample_rate, steps) segments: RDP composed by
    summing, converted with Balle et al. (2020), Thm. 21."""
    rdp = np.zeros(len(ORDERS))
    for sigma, q, steps in segments:
        rdp += steps * np.array([_log_moment(sigma, q, a) / (a - 1) for a in ORDERS])
    eps = rdp - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1) + np.log((ORDERS - 1) / ORDERS)
    return float(np.nanmin(eps))


def prv_epsilon(segments, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = [tuple(s) for s in segments]
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))


def segments_of(noise_per_step: list[float], q: float) -> list[tuple[float, float, int]]:
    """Consecutive steps with the same noise, as accountant segments."""
    out: list[tuple[float, float, int]] = []
    for sigma in noise_per_step:
        if out and out[-1][0] == sigma:
            out[-1] = (sigma, q, out[-1][2] + 1)
        else:
            out.append((sigma, q, 1))
    return out


# -- recording what a run did ----------------------------------------------------------


class Audit:
    """Every Poisson batch drawn (index -> example ids) and the noise multiplier of every step."""

    def __init__(self) -> None:
        self.draws: list[tuple[int, list[int]]] = []
        self.noise: list[float] = []

    @contextlib.contextmanager
    def watching(self, stop_at_draw: int | None = None):
        """Record; with ``stop_at_draw``, SIGTERM this process when that batch is drawn (as
        ``docker stop`` would): the trainer finishes the step, checkpoints and stops."""
        batch, add_noise, audit = dp.PoissonBatchSampler.batch, DPOptimizer.add_noise, self

        def recording_batch(sampler, i):
            out = batch(sampler, i)
            audit.draws.append((i, out))
            if i == stop_at_draw:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        def recording_noise(optimizer):
            audit.noise.append(optimizer.noise_multiplier)
            return add_noise(optimizer)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dp.PoissonBatchSampler, "batch", recording_batch)
            mp.setattr(DPOptimizer, "add_noise", recording_noise)
            yield self


def _train(job_path, job, audit: Audit, stop_at_draw: int | None = None):
    backend = HuggingFaceBackend(job, job_path.parent)
    try:
        with audit.watching(stop_at_draw):
            return backend.train()
    finally:
        backend.teardown()


def _stopped(job_path, job, audit: Audit, stop_at_draw: int) -> None:
    with pytest.raises(KeyboardInterrupt):
        _train(job_path, job, audit, stop_at_draw)


def _write_job(directory, tiny_model, *, eval_set: bool = False, **sections) -> tuple:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(N_TRAIN)))
    (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(8, seed=1)))
    body = {
        "model": {"base_model": str(tiny_model)},
        "data": {
            "train_path": "train.jsonl",
            "data_format": "prompt_completion",
            **({"eval_path": "eval.jsonl"} if eval_set else {}),
        },
        "training": {
            "max_steps": 10,
            "learning_rate": 5e-3,
            "per_device_train_batch_size": BATCH,
            "max_seq_length": 64,
            "save_steps": 4,
            **sections.pop("training", {}),
        },
        "privacy": {"dp_enabled": True, **sections.pop("privacy", {})},
        "evaluation": {"num_sample_generations": 2, "sample_max_new_tokens": 4, **sections.pop("evaluation", {})},
        **sections,
    }
    job = spec.validate(body)
    job.write(directory / "job.json")
    return directory / "job.json", job


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# -- a secure-mode run stopped in its second epoch, then resumed ------------------------


@pytest.fixture(scope="module")
def stopped_in_second_epoch(tmp_path_factory, tiny_model):
    """Default (secure) randomness, no eval set: stopped by SIGTERM at step 8 of 10, resumed."""
    job_path, job = _write_job(tmp_path_factory.mktemp("dp-resume"), tiny_model)
    first, second = Audit(), Audit()
    _stopped(job_path, job, first, stop_at_draw=7)
    metrics = _train(job_path, job, second)
    return job_path, job, first, second, metrics


def test_a_dp_run_stopped_in_its_second_epoch_resumes_the_batch_sequence(stopped_in_second_epoch):
    job_path, job, first, second, metrics = stopped_in_second_epoch
    out = job_path.parent / "output"
    assert [i for i, _ in first.draws] == list(range(8)) and len(first.noise) == 8
    # The resumed attempt draws batches 8 and 9, never epoch 0's again.
    assert [i for i, _ in second.draws] == [8, 9] and len(second.noise) == 2
    # What an uninterrupted run with this run's key draws, batch by batch.
    saved = json.loads((out / "checkpoints" / "checkpoint-10" / dp.SAMPLER_FILE).read_text())
    key = bytes.fromhex(saved["sampler_key"])
    uninterrupted = dp.PoissonBatchSampler(N_TRAIN, Q, key, steps_per_epoch=6)
    assert [b for _, b in first.draws + second.draws] == [uninterrupted.batch(i) for i in range(10)]
    assert [b for _, b in first.draws[:2]] != [b for _, b in second.draws]  # the replay the old sampler did
    # The key is secret: not derivable from the public seed, and written only to the checkpoints.
    assert key != dp._derived("sampler", job.training.seed, 32)
    assert saved["randomness"] == "secure" and metrics["dp_randomness"] == "secure" and metrics["dp_secure_rng"] == 1
    for public in ("job.json", "output/metrics.json", "output/dp_accounting.json", "output/metadata.json"):
        assert key.hex() not in (job_path.parent / public).read_text(), public
    assert (out / "checkpoints" / "checkpoint-10" / dp.SAMPLER_FILE).stat().st_mode & 0o077 == 0


def test_the_resumed_run_reports_the_epsilon_of_what_it_did(stopped_in_second_epoch):
    _, _, first, second, metrics = stopped_in_second_epoch
    did = segments_of(first.noise + second.noise, Q)
    assert did == [(metrics["dp_noise_multiplier"], Q, 10)]  # one noise level: the plan did not change
    assert metrics["dp_steps"] == 10 and metrics["epsilon"] <= job_target(metrics)
    assert metrics["epsilon"] == pytest.approx(independent_epsilon(did, DELTA), rel=1e-6)
    # RDP is an upper bound: the (tighter) PRV figure for the same steps is below it, not far.
    assert 0.5 * metrics["epsilon"] < prv_epsilon(did, DELTA) <= metrics["epsilon"]


def job_target(metrics) -> float:
    return metrics["dp_target_epsilon"]


def test_a_dp_run_keeps_its_private_training_statistics_out_of_logs_and_outputs(stopped_in_second_epoch):
    job_path, _, _, _, metrics = stopped_in_second_epoch
    out = job_path.parent / "output"
    assert metrics["dp_train_metrics_logged"] == 0
    for name in dp.PRIVATE_METRICS:
        assert name not in metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert "epsilon" in saved and not {"train_loss", "final_train_loss", "first_train_loss"} & saved.keys()
    state = json.loads((out / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["log_history"]
    assert not any({"loss", "grad_norm", "train_loss"} & entry.keys() for entry in state["log_history"])
    events = out / "events.jsonl"
    if events.exists():
        logged = [json.loads(line) for line in events.read_text().splitlines()]
        assert not any("loss" in e or "grad_norm" in e for e in logged if e.get("event") == "log")
    # No eval set: samples.jsonl must not copy training prompts (it is published with the model).
    assert (out / "samples.jsonl").read_text() == ""


# -- reproducible mode: a stopped-and-resumed run is the uninterrupted run --------------


def test_a_reproducible_dp_run_resumed_equals_the_uninterrupted_run(tmp_path, tiny_model):
    settings = dict(
        privacy={"dp_reproducible": True, "dp_log_train_metrics": True}, evaluation={"num_sample_generations": 0}
    )
    whole_path, whole_job = _write_job(tmp_path / "whole", tiny_model, **settings)
    whole = Audit()
    whole_metrics = _train(whole_path, whole_job, whole)
    parts_path, parts_job = _write_job(tmp_path / "parts", tiny_model, **settings)
    first, second = Audit(), Audit()
    _stopped(parts_path, parts_job, first, stop_at_draw=7)
    parts_metrics = _train(parts_path, parts_job, second)

    assert first.draws + second.draws == whole.draws
    assert first.noise + second.noise == whole.noise
    assert parts_metrics["epsilon"] == whole_metrics["epsilon"] and parts_metrics["dp_randomness"] == "reproducible"
    # Batches, noise, RNG and optimizer state all resumed: the adapters match.
    a, b = _adapter(whole_path.parent / "output"), _adapter(parts_path.parent / "output")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Opted in: the training loss is logged and saved.
    assert "final_train_loss" in parts_metrics and parts_metrics["dp_train_metrics_logged"] == 1


# -- a retry with a larger step budget -------------------------------------------------


@pytest.fixture(scope="module")
def budget_raised(tmp_path_factory, tiny_model):
    """Target 3: stopped at step 4 of 8, then retried with max_steps 16."""
    directory = tmp_path_factory.mktemp("dp-budget")
    job_path, job = _write_job(
        directory,
        tiny_model,
        training={"max_steps": 8},
        privacy={"dp_target_epsilon": 3.0},
        evaluation={"num_sample_generations": 0},
    )
    first, second = Audit(), Audit()
    _stopped(job_path, job, first, stop_at_draw=3)
    longer = job.model_copy(update={"training": job.training.model_copy(update={"max_steps": 16})})
    longer.write(job_path)
    metrics = _train(job_path, longer, second)
    return job_path, first, second, metrics


def test_a_retry_with_a_larger_step_budget_stays_within_the_target(budget_raised):
    job_path, first, second, metrics = budget_raised
    did = segments_of(first.noise + second.noise, Q)
    assert [k for _, _, k in did] == [4, 12]
    (s1, _, _), (s2, _, _) = did
    assert s2 > s1  # the 12 steps left are paid for with more noise, from what the first 4 left
    assert metrics["dp_steps"] == 16 and metrics["epsilon"] <= 3.0
    independent = independent_epsilon(did, DELTA)
    assert independent <= 3.0 * (1 + 1e-6) and independent == pytest.approx(metrics["epsilon"], rel=1e-6)
    assert (job_path.parent / "output" / "_SUCCESS").exists()


def test_epsilon_recomputed_from_the_recorded_history_equals_the_reported_one(budget_raised):
    job_path, first, second, metrics = budget_raised
    record = json.loads((job_path.parent / "output" / dp.ACCOUNTING_FILE).read_text())
    segments = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in record["segments"]]
    # The record is what the run did, step by step.
    assert segments == segments_of(first.noise + second.noise, Q)
    assert record["delta"] == pytest.approx(DELTA) and record["epsilon"] == metrics["epsilon"]
    assert [a["start_step"] for a in record["attempts"]] == [0, 4]
    # Recomputed with the recorded accountant and orders: the same number.
    rdp = RDPAccountant()
    rdp.history = segments
    recomputed = rdp.get_epsilon(delta=record["delta"], alphas=record["rdp_orders"])
    assert recomputed == pytest.approx(metrics["epsilon"], rel=1e-12)
    # And by the independent accountant, from the same artifact.
    assert independent_epsilon(segments, record["delta"]) == pytest.approx(metrics["epsilon"], rel=1e-6)
    assert metrics["dp_history"] == [list(s) for s in segments]


def test_a_retry_after_the_budget_is_spent_is_refused_before_any_step(budget_raised):
    # The run above finished within the calibration tolerance of its target: nothing is left.
    job_path, _, _, metrics = budget_raised
    out = job_path.parent / "output"
    assert metrics["epsilon"] >= 3.0 - dp.EPSILON_TOLERANCE
    job = spec.load(job_path)
    job.model_copy(update={"training": job.training.model_copy(update={"max_steps": 20})}).write(job_path)
    success = (out / "_SUCCESS").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow_trainer", "--job", str(job_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == EXIT_BAD_SPEC, proc.stderr[-2000:]
    assert "privacy budget is spent" in proc.stderr and "dp_target_epsilon 3" in proc.stderr
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints[-1] == 16  # no step was trained
    assert (out / "_SUCCESS").read_text() == success  # the finished 16-step outputs were not replaced


def test_the_registry_refuses_a_dp_version_over_its_target(stopped_in_second_epoch):
    from loraflow import registry

    job_path, *_ = stopped_in_second_epoch
    out = job_path.parent / "output"
    registry.verify_outputs(out)  # the real run passes
    accounting = json.loads((out / dp.ACCOUNTING_FILE).read_text())
    metrics_text, accounting_text = (out / "metrics.json").read_text(), (out / dp.ACCOUNTING_FILE).read_text()
    try:
        over = {**accounting, "epsilon": accounting["target_epsilon"] * 1.5}
        (out / dp.ACCOUNTING_FILE).write_text(json.dumps(over))
        with pytest.raises(registry.RegistryError, match="over the target"):
            registry.verify_outputs(out)
        (out / dp.ACCOUNTING_FILE).unlink()
        with pytest.raises(registry.RegistryError, match="no dp_accounting.json"):
            registry.verify_outputs(out)
    finally:
        (out / "metrics.json").write_text(metrics_text)
        (out / dp.ACCOUNTING_FILE).write_text(accounting_text)


# -- settings checked against the data, before training ---------------------------------


def test_an_out_of_range_delta_is_refused_naming_the_dataset_size(tmp_path, tiny_model):
    job_path, _ = _write_job(tmp_path, tiny_model, privacy={"dp_delta": 0.5})
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow_trainer", "--job", str(job_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == EXIT_BAD_SPEC, proc.stderr[-2000:]
    assert f"n = {N_TRAIN} training examples" in proc.stderr and "1/n^1.1" in proc.stderr
    assert not list((tmp_path / "output").glob("checkpoints/checkpoint-*"))


def test_a_dp_batch_as_large_as_the_data_is_refused(tmp_path, tiny_model):
    job_path, job = _write_job(
        tmp_path, tiny_model, training={"per_device_train_batch_size": 16, "gradient_accumulation_steps": 3}
    )
    with pytest.raises(JobSpecError, match=f"= 48\\) must be smaller than the {N_TRAIN} training examples"):
        _train(job_path, job, Audit())


# -- Poisson sampling as the accountant assumes it --------------------------------------


def test_poisson_batches_include_each_example_with_probability_q():
    sampler = dp.PoissonBatchSampler(1000, 0.05, key=b"k" * 32, steps_per_epoch=20)
    sizes = [len(sampler.batch(i)) for i in range(400)]
    assert abs(np.mean(sizes) - 50) < 1.2  # 400 draws of Binomial(1000, 0.05): sd of the mean 0.34
    counts = np.bincount(np.concatenate([sampler.batch(i) for i in range(400)]), minlength=1000)
    assert abs(counts.mean() - 20) < 0.5 and counts.std() == pytest.approx(np.sqrt(400 * 0.05 * 0.95), rel=0.15)
    assert sampler.batch(3) == dp.PoissonBatchSampler(1000, 0.05, key=b"k" * 32, steps_per_epoch=20).batch(3)
    assert sampler.batch(3) != dp.PoissonBatchSampler(1000, 0.05, key=b"j" * 32, steps_per_epoch=20).batch(3)


def test_an_empty_poisson_batch_is_a_noise_only_step_the_accountant_counts(tmp_path, tiny_model):
    # Batch size 1 of 48: a step is empty with probability (47/48)^48 ~ 0.36. Pick a seed
    # whose (reproducible) first batch is empty.
    seed = next(
        s
        for s in range(1000)
        if not dp.PoissonBatchSampler(N_TRAIN, 1 / N_TRAIN, dp._derived("sampler", s, 32), 48).batch(0)
    )
    job_path, job = _write_job(
        tmp_path,
        tiny_model,
        training={"max_steps": 1, "per_device_train_batch_size": 1, "seed": seed},
        privacy={"dp_reproducible": True},
        evaluation={"num_sample_generations": 0},
    )
    audit = Audit()
    metrics = _train(job_path, job, audit)
    assert audit.draws == [(0, [])] and len(audit.noise) == 1
    assert metrics["global_step"] == 1 and metrics["dp_steps"] == 1 and metrics["epsilon"] > 0
    assert metrics["dp_changed_lora_tensors"] > 0  # the noise moved the weights
