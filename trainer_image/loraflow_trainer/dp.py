"""DP-SGD for the HF Trainer with Opacus: a Trainer subclass, not a second training loop.

The seams it uses:
- ``get_train_dataloader``: Poisson sampling (each example joins a step with probability
  q = batch / n), the sampling the privacy accountant assumes.
- ``create_optimizer``: the Trainer's optimizer wrapped in Opacus' ``DPOptimizer``
  (per-sample clipping to ``dp_max_grad_norm`` plus Gaussian noise calibrated to reach
  ``dp_target_epsilon`` at ``dp_delta`` after the planned number of steps), with the RDP
  accountant stepped on every optimizer step.
- ``compute_loss``: the mean over examples of each example's mean token loss, so each
  example's gradient depends on that example only.

Per-sample gradients come from Opacus hooks attached to the model in place
(``GradSampleHooks``): the model stays the PeftModel the Trainer and ``save_pretrained``
expect. Hooks are attached after the model reached its device: moving it afterwards would
silently stop LoRA updates. Gradient checkpointing is refused: non-reentrant checkpointing
leaves per-sample gradients empty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader
from transformers import Trainer

from loraflow_trainer.data import IGNORE_INDEX
from loraflow_trainer.errors import JobSpecError, LoraflowTrainerError
from loraflow_trainer.spec import PrivacySpec

ACCOUNTANT_FILE = "dp_accountant.json"


class OpacusDPTrainer(Trainer):
    def __init__(self, *args, privacy: PrivacySpec, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_checkpointing or getattr(self.model, "is_gradient_checkpointing", False):
            raise JobSpecError("privacy.dp_enabled cannot be combined with gradient_checkpointing; turn one off")
        if self.args.gradient_accumulation_steps != 1 or self.args.max_grad_norm > 0:
            # The backend folds accumulation into the batch and turns batch-level clipping
            # off; anything else would step the accountant on a different unit than Opacus.
            raise ValueError("OpacusDPTrainer needs gradient_accumulation_steps=1 and max_grad_norm=0")
        n = len(self.train_dataset)
        # One Poisson batch per optimizer step, of expected size logical_batch.
        self.logical_batch = self.args.per_device_train_batch_size
        self.sample_rate = min(1.0, self.logical_batch / n)
        self.delta = privacy.dp_delta or 1.0 / (n**1.1)
        self.max_grad_norm = privacy.dp_max_grad_norm
        self.target_epsilon = privacy.dp_target_epsilon
        steps_per_epoch = max(1, int(1 / self.sample_rate))
        self.planned_steps = self.args.max_steps if self.args.max_steps > 0 else math.ceil(self.args.num_train_epochs * steps_per_epoch)
        self.noise_multiplier = get_noise_multiplier(
            target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
            steps=self.planned_steps, accountant="rdp",
        )
        self.accountant = RDPAccountant()
        self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean")
        self._lora_before = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        print(json.dumps({
            "event": "dp", "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "delta": self.delta, "planned_steps": self.planned_steps, "max_grad_norm": self.max_grad_norm,
        }), flush=True)

    def get_train_dataloader(self) -> DataLoader:
        sampler = UniformWithReplacementSampler(
            num_samples=len(self.train_dataset), sample_rate=self.sample_rate,
            generator=torch.Generator().manual_seed(self.args.seed),
        )
        return DataLoader(
            self.train_dataset, batch_sampler=_NonEmpty(sampler), collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )

    def create_optimizer(self, model=None):
        base = super().create_optimizer(model)
        if not isinstance(base, DPOptimizer):
            self.optimizer = DPOptimizer(
                base, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.logical_batch, loss_reduction="mean",
            )
            self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # The privacy spent so far is part of the training state: a resumed run that
        # forgot it would report a smaller epsilon than the data actually paid.
        (Path(output_dir) / ACCOUNTANT_FILE).write_text(json.dumps({"history": self.accountant.history}))

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
        self.accountant.history = [tuple(h) for h in json.loads(saved.read_text())["history"]]

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The Trainer clears grads with model.zero_grad(), which leaves Opacus' per-sample
        # grads (and its processed flags) behind; one Poisson batch is one step, so clear here.
        self.optimizer.zero_grad(set_to_none=True)
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
        loss = ((token_loss.sum(dim=1) / counts)).mean()
        return (loss, outputs) if return_outputs else loss

    def privacy_report(self) -> dict[str, float]:
        """Achieved epsilon at delta, and proof that DP training changed the LoRA weights."""
        changed = sum(
            int(not torch.equal(p.detach(), self._lora_before[k]))
            for k, p in self.model.named_parameters() if k in self._lora_before
        )
        if self.state.global_step > 0 and changed == 0:
            raise LoraflowTrainerError(
                "DP-SGD ran but no LoRA weight changed (Opacus hooks saw no per-sample gradients); "
                "this is a loraflow bug: report it with the job spec"
            )
        steps = self.state.global_step
        epsilon = self.accountant.get_epsilon(delta=self.delta) if steps else 0.0
        if epsilon > self.target_epsilon * 1.001:
            # Happens when a resumed run trains longer than the noise was calibrated for.
            print(json.dumps({"event": "warning", "message": f"achieved epsilon {epsilon:.3f} exceeds "
                              f"dp_target_epsilon {self.target_epsilon}: the steps ran past the calibrated plan"}), flush=True)
        return {
            "epsilon": float(epsilon), "delta": float(self.delta), "dp_noise_multiplier": float(self.noise_multiplier),
            "dp_sample_rate": float(self.sample_rate), "dp_steps": int(steps), "dp_changed_lora_tensors": changed,
        }


class _NonEmpty:
    """Drops the (rare) empty Poisson batch, which the collator and the model cannot take.

    Skipping leaks only that a step had no example; with q * n >= 1 it has probability
    (1 - q)^n, negligible for the dataset sizes DP is run on.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        return (batch for batch in self.sampler if len(batch) > 0)

    def __len__(self) -> int:
        return len(self.sampler)
