"""DP-SGD for the HF Trainer with Opacus: a Trainer subclass, not a second training loop.

The seams it uses:
- ``get_train_dataloader``: Poisson sampling (each example joins a step with probability
  q = batch / n), the sampling the privacy accountant assumes. Batch ``i`` is a pure
  function of a 256-bit key and ``i`` (``PoissonBatchSampler``), so a resumed run draws
  exactly the batches an uninterrupted run would: the key travels in the checkpoint, and
  the sampler starts at the checkpoint's step (the Trainer's own batch skipping is off).
- ``create_optimizer``: the Trainer's optimizer wrapped in Opacus' ``DPOptimizer``
  (per-sample clipping to ``dp_max_grad_norm`` plus Gaussian noise calibrated to reach
  ``dp_target_epsilon`` at ``dp_delta`` after the planned number of steps), with the RDP
  accountant stepped on every optimizer step.
- ``_save/_load_optimizer_and_scheduler``: the accountant's history (every
  (noise multiplier, sample rate, steps) segment spent so far) and the sampler state are
  part of the checkpoint. A resumed run keeps its noise multiplier if the plan still fits
  the target, recalibrates the remaining steps from what is left if it does not, and is
  refused before its first step when nothing is left.
- ``training_step``: an empty Poisson batch is still a step (the accountant counts it):
  the update is noise alone.
- ``compute_loss``: the mean over examples of each example's mean token loss, so each
  example's gradient depends on that example only.
- ``log``: the training loss and gradient norm are computed from private batches without
  noise; unless ``dp_log_train_metrics`` is set they are never logged or saved.

Randomness: by default the sampler key comes from ``os.urandom`` (SHAKE-256 keyed on it
draws the batches) and the noise generator is seeded from ``os.urandom`` in each attempt,
with Opacus' secure noise (robust to floating-point attacks). Both are secret: they are
never in job.json or the MLflow params, only the sampler key is in the checkpoints.
``dp_reproducible`` derives both from ``seed`` instead, so a run can be repeated exactly,
at the price of batches anyone who knows the seed can recompute.

Per-sample gradients come from Opacus hooks attached to the model in place
(``GradSampleHooks``): the model stays the PeftModel the Trainer and ``save_pretrained``
expect. Hooks are attached after the model reached its device: moving it afterwards would
silently stop LoRA updates. Gradient checkpointing is refused: non-reentrant checkpointing
leaves per-sample gradients empty.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader
from transformers import Trainer

from loraflow_trainer import contract, progress
from loraflow_trainer.data import IGNORE_INDEX
from loraflow_trainer.errors import JobSpecError, LoraflowTrainerError
from loraflow_trainer.spec import PrivacySpec

# In each checkpoint: what was spent (public) and the sampler's key (secret).
ACCOUNTANT_FILE = "dp_accountant.json"
SAMPLER_FILE = "dp_sampler.json"
# In the outputs: the whole history, from which anyone can recompute epsilon.
ACCOUNTING_FILE = contract.ACCOUNTING_FILE
ACCOUNTANT = "rdp"
# Statistics of the private batches computed without noise: outside the DP guarantee.
PRIVATE_LOG_KEYS = frozenset({"loss", "grad_norm", "train_loss"})
PRIVATE_METRICS = (
    "train_loss",
    "first_train_loss",
    "final_train_loss",
    "train_tokens",
    "tokens_per_second",
    "tokens_per_second_per_device",
)
# Noise multipliers beyond this buy no accuracy worth having: the budget is treated as spent.
MAX_NOISE_MULTIPLIER = 1e6
# How far below the target calibration may land (Opacus' default).
EPSILON_TOLERANCE = 0.01


class PrivacyBudgetError(JobSpecError):
    """The run would spend more than dp_target_epsilon."""


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of a history of (noise_multiplier, sample_rate, steps) segments (RDP)."""
    if not history or sum(int(h[2]) for h in history) == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(accountant.get_epsilon(delta=delta))


def calibrate(
    history, sample_rate: float, steps: int, target: float, delta: float, tolerance: float = EPSILON_TOLERANCE
) -> float | None:
    """The noise multiplier for ``steps`` more steps after ``history`` that lands the composed
    epsilon within ``tolerance`` below ``target`` (Opacus' search, over the composition);
    None when even MAX_NOISE_MULTIPLIER would overrun it."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    spent = sum(
        (compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders) for s, q, k in history), np.zeros(len(orders))
    )

    def eps(sigma: float) -> float:
        rdp = spent + compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])

    low, high = 0.0, 10.0
    eps_high = eps(high)
    while eps_high > target:
        if high >= MAX_NOISE_MULTIPLIER:
            return None
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
        eps_high = eps(high)
    while target - eps_high > tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def _derived(label: str, seed: int, size: int) -> bytes:
    return hashlib.sha256(f"loraflow-dp-{label}:{seed}".encode()).digest()[:size]


class PoissonBatchSampler:
    """Batches of independent Poisson draws; batch ``i`` depends only on ``key`` and ``i``.

    Example ``j`` is in batch ``i`` when the j-th 64-bit word of SHAKE-256(key || i) is below
    ``q * 2**64``: each example joins each step independently with probability q (never
    above it), from a cryptographic stream when the key is secret. ``position`` is the
    index of the next batch; one pass (an "epoch") is ``int(1 / q)`` batches, as in Opacus.
    """

    def __init__(self, num_samples: int, sample_rate: float, key: bytes, steps_per_epoch: int):
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.key = key
        self.steps_per_epoch = steps_per_epoch
        self.position = 0
        self._threshold = np.uint64(min(int(sample_rate * 2**64), 2**64 - 1))

    def batch(self, i: int) -> list[int]:
        stream = hashlib.shake_256(self.key + int(i).to_bytes(8, "big")).digest(8 * self.num_samples)
        words = np.frombuffer(stream, dtype="<u8")
        return np.flatnonzero(words < self._threshold).tolist()

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            i = self.position
            self.position += 1
            yield self.batch(i)

    def __len__(self) -> int:
        return self.steps_per_epoch


class _EmptyBatchCollator:
    """The collator, plus a zero-row batch for an empty Poisson draw (which it cannot take)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if not features:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": torch.full((0, 1), IGNORE_INDEX)}
        return self.collator(features)


class OpacusDPTrainer(Trainer):
    def __init__(self, *args, privacy: PrivacySpec, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_checkpointing or getattr(self.model, "is_gradient_checkpointing", False):
            raise JobSpecError("privacy.dp_enabled cannot be combined with gradient_checkpointing; turn one off")
        if self.args.gradient_accumulation_steps != 1 or self.args.max_grad_norm > 0 or not self.args.ignore_data_skip:
            # The backend folds accumulation into the batch, turns batch-level clipping off, and
            # leaves resuming the batch sequence to the sampler; anything else would step the
            # accountant on a different unit than Opacus, or skip batches twice on resume.
            raise ValueError(
                "OpacusDPTrainer needs gradient_accumulation_steps=1, max_grad_norm=0 and ignore_data_skip=True"
            )
        n = len(self.train_dataset)
        # One Poisson batch per optimizer step, of expected size logical_batch.
        self.logical_batch = self.args.per_device_train_batch_size
        privacy.check_dataset(n, self.logical_batch)
        self.num_train_examples = n
        self.sample_rate = self.logical_batch / n
        self.delta = privacy.delta_for(n)
        self.max_grad_norm = privacy.dp_max_grad_norm
        self.target_epsilon = privacy.dp_target_epsilon
        self.reproducible = privacy.dp_reproducible
        self.log_train_metrics = privacy.dp_log_train_metrics
        self.randomness = "reproducible" if self.reproducible else "secure"
        self.steps_per_epoch = max(1, int(1 / self.sample_rate))
        self.planned_steps = (
            self.args.max_steps
            if self.args.max_steps > 0
            else math.ceil(self.args.num_train_epochs * self.steps_per_epoch)
        )
        self.noise_multiplier = calibrate([], self.sample_rate, self.planned_steps, self.target_epsilon, self.delta)
        if self.noise_multiplier is None:
            raise PrivacyBudgetError(
                f"no noise level reaches dp_target_epsilon {self.target_epsilon} in "
                f"{self.planned_steps} steps; "
                "raise dp_target_epsilon or train fewer steps"
            )
        self.accountant = RDPAccountant()
        key = _derived("sampler", self.args.seed, 32) if self.reproducible else os.urandom(32)
        self.sampler = PoissonBatchSampler(n, self.sample_rate, key, self.steps_per_epoch)
        # Attempts of this run (one per resume): where each began, with which noise and randomness.
        self.attempts: list[dict[str, Any]] = [self._attempt(0)]
        self.dp_optimizer: DPOptimizer | None = None
        self.noise_generator: torch.Generator | None = None
        self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean")
        self._lora_before = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        progress.emit(
            "dp",
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            delta=self.delta,
            planned_steps=self.planned_steps,
            max_grad_norm=self.max_grad_norm,
            randomness=self.randomness,
            train_metrics_logged=self.log_train_metrics,
        )

    def _attempt(self, start_step: int) -> dict[str, Any]:
        return {
            "start_step": start_step,
            "planned_steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "randomness": self.randomness,
        }

    # -- sampling --------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_sampler=self.sampler,
            collate_fn=_EmptyBatchCollator(self.data_collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            # Its own generator for the workers' base seed: drawing it from the global RNG on each
            # pass would shift a resumed run's dropout masks off the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    # -- noise and accounting --------------------------------------------------------

    def create_optimizer(self, model=None):
        base = super().create_optimizer(model)
        if not isinstance(base, DPOptimizer):
            device = next(p.device for p in self.model.parameters() if p.requires_grad)
            self.noise_generator = torch.Generator(device=device)
            seed = _derived("noise", self.args.seed, 8) if self.reproducible else os.urandom(8)
            self.noise_generator.manual_seed(int.from_bytes(seed, "big") >> 1)
            self.optimizer = self.dp_optimizer = DPOptimizer(
                base,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.logical_batch,
                loss_reduction="mean",
                generator=self.noise_generator,
                secure_mode=not self.reproducible,
            )
            self.dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # The privacy spent so far is part of the training state: a resumed run that
        # forgot it would report a smaller epsilon than the data actually paid.
        out = Path(output_dir)
        (out / ACCOUNTANT_FILE).write_text(
            json.dumps(
                {
                    "accountant": ACCOUNTANT,
                    "history": self.accountant.history,
                    "attempts": self.attempts,
                }
            )
        )
        sampler = {
            "sampler_key": self.sampler.key.hex(),
            "draws": int(self.state.global_step),
            "randomness": self.randomness,
        }
        if self.reproducible and self.noise_generator is not None:
            state = self.noise_generator.get_state().numpy().tobytes()
            sampler["noise_generator_state"] = base64.b64encode(state).decode()
        path = out / SAMPLER_FILE
        # The key says which examples were in which step: readable by this user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(sampler, f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        saved = Path(checkpoint) / ACCOUNTANT_FILE
        if not saved.exists():
            raise LoraflowTrainerError(
                f"checkpoint {checkpoint} has no {ACCOUNTANT_FILE}, so the privacy already spent is unknown; "
                "delete the checkpoints directory to train from scratch"
            )
        record = json.loads(saved.read_text())
        history = [(float(s), float(q), int(k)) for s, q, k in record["history"]]
        done = int(self.state.global_step)
        if sum(k for _, _, k in history) != done:
            raise LoraflowTrainerError(
                f"checkpoint {checkpoint} is at step {done} but its {ACCOUNTANT_FILE} accounts for "
                f"{sum(k for _, _, k in history)} steps; the checkpoint is inconsistent: delete it to resume from an "
                "earlier one"
            )
        self.accountant.history = history
        self._restore_sampler(Path(checkpoint) / SAMPLER_FILE, done)
        self._plan_remaining(history, done)
        self.attempts = [*record.get("attempts", []), self._attempt(done)]

    def _restore_sampler(self, path: Path, done: int) -> None:
        """Continue the checkpoint's batch sequence at batch ``done`` (its noise too, if reproducible)."""
        self.sampler.position = done
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("randomness") != self.randomness:
            # A changed mode (or a checkpoint from before the key was saved) starts a fresh
            # independent sequence: valid for the accountant, recorded in the attempts.
            progress.emit("dp_new_sampler", reason="the checkpoint's randomness differs", step=done)
            return
        self.sampler.key = bytes.fromhex(saved["sampler_key"])
        state = saved.get("noise_generator_state")
        if self.reproducible and state and self.noise_generator is not None:
            raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
            self.noise_generator.set_state(torch.from_numpy(raw))

    def _plan_remaining(self, history, done: int) -> None:
        """Noise for the steps still to run: the current noise if the whole plan fits the
        target, else recalibrated from the budget that is left; refused when none is left."""
        remaining = self.planned_steps - done
        if remaining <= 0:
            return
        last_sigma, last_q = (history[-1][0], history[-1][1]) if history else (self.noise_multiplier, self.sample_rate)
        keep = last_sigma if last_q == self.sample_rate else self.noise_multiplier
        if epsilon_of([*history, (keep, self.sample_rate, remaining)], self.delta) <= self.target_epsilon:
            sigma = keep
        else:
            spent = epsilon_of(history, self.delta)
            # Calibration lands within EPSILON_TOLERANCE of the target, so a budget that close
            # to it is spent (what is left would buy only steps that are noise).
            left = self.target_epsilon - spent
            sigma = None
            if left > EPSILON_TOLERANCE:
                sigma = calibrate(history, self.sample_rate, remaining, self.target_epsilon, self.delta)
            if sigma is None:
                raise PrivacyBudgetError(
                    f"the privacy budget is spent: the {done} steps already trained cost epsilon {spent:.4g} of "
                    f"dp_target_epsilon {self.target_epsilon:g}, which leaves nothing for {remaining} more; "
                    "set max_steps "
                    f"to {done} to finish with what was trained, or raise dp_target_epsilon (a weaker guarantee)"
                )
            progress.emit(
                "dp_recalibrated",
                step=done,
                spent_epsilon=spent,
                remaining_steps=remaining,
                old_noise_multiplier=keep,
                noise_multiplier=sigma,
            )
        self.noise_multiplier = sigma
        if self.dp_optimizer is not None:
            self.dp_optimizer.noise_multiplier = sigma

    # -- the step --------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step >= self.planned_steps:
            raise LoraflowTrainerError(
                f"DP-SGD was about to run step {self.state.global_step + 1} of a {self.planned_steps}-step plan, "
                "past what "
                "the noise was calibrated for; this is a loraflow bug: report it with the job spec"
            )
        # The Trainer clears grads with model.zero_grad(), which leaves Opacus' per-sample
        # grads (and its processed flags) behind; one Poisson batch is one step, so clear here.
        self.optimizer.zero_grad(set_to_none=True)
        if inputs["input_ids"].shape[0] == 0:
            # An empty Poisson batch is a step like any other for the accountant: the
            # update is the noise alone (zero per-sample gradients, clipped, noised, scaled).
            for p in self.dp_optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1, :].float()
        target = labels[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(target.shape)
        counts = (target != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        loss = (token_loss.sum(dim=1) / counts).mean()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.log_train_metrics:
            logs = {k: v for k, v in logs.items() if k not in PRIVATE_LOG_KEYS}
        super().log(logs, start_time)

    # -- reports ---------------------------------------------------------------------

    def public_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The run's metrics less the noiseless statistics of the private batches (unless opted in)."""
        if self.log_train_metrics:
            return metrics
        return {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}

    def privacy_report(self) -> dict[str, Any]:
        """Achieved epsilon at delta, and proof that DP training changed the LoRA weights.

        Raises when the epsilon spent exceeds the target, so such a run never writes _SUCCESS."""
        changed = sum(
            int(not torch.equal(p.detach(), self._lora_before[k]))
            for k, p in self.model.named_parameters()
            if k in self._lora_before
        )
        if self.state.global_step > 0 and changed == 0:
            raise LoraflowTrainerError(
                "DP-SGD ran but no LoRA weight changed (Opacus hooks saw no per-sample gradients); "
                "this is a loraflow bug: report it with the job spec"
            )
        history = [(float(s), float(q), int(k)) for s, q, k in self.accountant.history]
        epsilon = epsilon_of(history, self.delta)
        if epsilon > self.target_epsilon * (1 + 1e-9):
            raise PrivacyBudgetError(
                f"the run spent epsilon {epsilon:.4g}, over dp_target_epsilon {self.target_epsilon:g}; "
                "its outputs are not "
                "written: lower max_steps, or raise dp_target_epsilon"
            )
        modes = {a["randomness"] for a in self.attempts}
        return {
            "epsilon": epsilon,
            "delta": float(self.delta),
            "dp_target_epsilon": float(self.target_epsilon),
            "dp_noise_multiplier": float(history[-1][0] if history else self.noise_multiplier),
            "dp_sample_rate": float(self.sample_rate),
            "dp_steps": int(sum(k for _, _, k in history)),
            "dp_segments": len(history),
            "dp_history": [list(h) for h in history],
            "dp_randomness": modes.pop() if len(modes) == 1 else "mixed",
            "dp_secure_rng": int(not self.reproducible and all(a["randomness"] == "secure" for a in self.attempts)),
            "dp_train_metrics_logged": int(self.log_train_metrics),
            "dp_changed_lora_tensors": changed,
        }

    def accounting_record(self) -> dict[str, Any]:
        """What ``dp_accounting.json`` holds: everything needed to recompute epsilon."""
        import opacus

        history = [(float(s), float(q), int(k)) for s, q, k in self.accountant.history]
        return {
            "accountant": ACCOUNTANT,
            "accountant_library": f"opacus {opacus.__version__}",
            "rdp_orders": list(RDPAccountant.DEFAULT_ALPHAS),
            "mechanism": "Poisson-subsampled Gaussian (DP-SGD), add/remove-one-example neighbouring datasets",
            "segments": [{"noise_multiplier": s, "sample_rate": q, "steps": k} for s, q, k in history],
            "steps": int(sum(k for _, _, k in history)),
            "delta": float(self.delta),
            "epsilon": epsilon_of(history, self.delta),
            "target_epsilon": float(self.target_epsilon),
            "max_grad_norm": float(self.max_grad_norm),
            "train_examples": self.num_train_examples,
            "expected_batch_size": self.logical_batch,
            "attempts": self.attempts,
            "train_metrics_logged": self.log_train_metrics,
        }
