"""What a run measures: eval metrics inside the Trainer, then the run's own metrics (metrics.json).

``preprocess_logits_for_metrics`` and ``compute_metrics`` are the Trainer's eval seams;
``train_metrics`` and ``eval_metrics`` turn a finished training loop into the flat dict
that ``metrics.json``, the ``metrics`` event and the registered version's cost tags read.
"""

from __future__ import annotations

import math
import resource
from typing import Any

import numpy as np
import torch

from loraflow_trainer.callbacks import LineLogCallback
from loraflow_trainer.data import IGNORE_INDEX
from loraflow_trainer.launch import Placement
from loraflow_trainer.spec import JobSpec

# exp() of a diverged run's loss overflows; past e^50 a perplexity says nothing more anyway.
MAX_LOG_PERPLEXITY = 50.0


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, MAX_LOG_PERPLEXITY)))


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Reduce logits to argmax token ids right after the forward pass.

    The Trainer otherwise keeps every eval batch's full (batch, seq, vocab) logits, which
    runs out of memory on large vocabularies.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds) -> dict[str, float]:
    """Eval loss (mean of the per-batch losses), perplexity, and next-token accuracy."""
    losses = np.asarray(eval_preds.losses if eval_preds.losses is not None else [], dtype=np.float64).ravel()
    metrics: dict[str, float] = {}
    if losses.size:
        mean = float(losses.mean())
        metrics["loss_mean"] = mean
        metrics["perplexity"] = perplexity(mean)
    preds, labels = np.asarray(eval_preds.predictions), np.asarray(eval_preds.label_ids)
    if preds.ndim == 2 and labels.shape == preds.shape:
        # Prediction at t is for the label at t + 1.
        p, lab = preds[:, :-1], labels[:, 1:]
        keep = lab != IGNORE_INDEX
        if keep.any():
            metrics["token_accuracy"] = float((p[keep] == lab[keep]).mean())
    return metrics


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_metrics(
    job: JobSpec, trainer, output, runtime: float, log: LineLogCallback, model, place: Placement
) -> dict[str, Any]:
    """Loss, tokens, throughput, memory and cost of the training loop that just ended.

    ``output`` is ``Trainer.train``'s result, ``runtime`` this attempt's seconds in it.
    """
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    session_tokens = tokens - log.tokens_at_start
    if place.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics: dict[str, Any] = {
        "train_loss": float(output.training_loss),
        # Cumulative over attempts; the rate is this attempt's tokens over its own runtime.
        "train_tokens": tokens,
        "tokens_per_second": session_tokens / runtime if runtime > 0 else 0.0,
        "train_runtime_s": runtime,
        "peak_memory_mb": peak_mb,
        "global_step": int(state.global_step),
        "trainable_parameters": trainable_parameters(model),
    }
    if log.losses:  # a resumed run that was already finished logs no step
        metrics.update(first_train_loss=log.losses[0], final_train_loss=log.losses[-1])
    metrics.update(device_metrics(job, trainer.args, place, metrics["tokens_per_second"], runtime))
    return metrics


def device_metrics(job: JobSpec, args, place: Placement, tokens_per_second: float, runtime: float) -> dict[str, Any]:
    """What the run trained on and its batch: the cost tags of the registered version read these.

    The batch is reported as the job set it; ``args`` are the Trainer's arguments as it ran
    (DP folds the accumulation into the batch).
    """
    t = job.training
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    name = torch.cuda.get_device_name(place.local_rank) if place.device == "cuda" else "cpu"
    return {
        "device_name": name,
        "device_count": place.world_size,  # one process per device
        "distributed": place.strategy,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # Examples per optimizer step: per device x accumulation x processes (DP draws the
        # logical batch whole, so its per-device size already holds the accumulation).
        "effective_batch_size": per_step * place.world_size,
        "device_seconds": runtime * place.world_size,
        "gpu_seconds": runtime * place.world_size if place.device == "cuda" else 0.0,
        "tokens_per_second_per_device": tokens_per_second / place.world_size,
    }


def eval_metrics(trainer, eval_dataset) -> dict[str, float]:
    """Eval loss, perplexity and token accuracy on the eval set (empty when the job has none)."""
    if eval_dataset is None:
        return {}
    ev = trainer.evaluate()
    metrics = {"eval_loss": float(ev["eval_loss"]), "perplexity": perplexity(ev["eval_loss"])}
    if "eval_token_accuracy" in ev:
        metrics["eval_token_accuracy"] = float(ev["eval_token_accuracy"])
    return metrics
