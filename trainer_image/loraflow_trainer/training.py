"""The Trainer stage: TrainingArguments from the job, the Trainer (or DP trainer) built on the
model and datasets, the checkpoint a retry resumes from, and the training loop itself.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from loraflow_trainer import data, launch, progress
from loraflow_trainer.callbacks import StopOnSignalCallback
from loraflow_trainer.errors import OutOfMemoryError
from loraflow_trainer.launch import Placement
from loraflow_trainer.metrics import compute_metrics, preprocess_logits_for_metrics
from loraflow_trainer.spec import JobSpec

# Trainer arguments loraflow fixes: the job spec does not expose them because changing
# them breaks an assumption elsewhere (line logging through Docker, checkpoint resume,
# token accounting, our own collators).
FIXED_RUNTIME_TRAINING_ARGS: dict[str, Any] = {
    "logging_strategy": IntervalStrategy.STEPS,
    "save_strategy": IntervalStrategy.STEPS,
    "disable_tqdm": True,
    "report_to": [],
    "remove_unused_columns": False,
    "include_num_input_tokens_seen": "non_padding",
    "include_for_metrics": ["loss"],
    "ddp_find_unused_parameters": False,
    "save_only_model": False,
}


def arguments(
    job: JobSpec, place: Placement, dtype: torch.dtype, checkpoint_dir: Path, eval_set: bool, **overrides: Any
) -> TrainingArguments:
    """The job's training and evaluation sections as TrainingArguments, for this placement.

    ``dtype`` is the one the model was loaded in (bfloat16 turns on bf16 autocast);
    ``eval_set`` says whether there is an eval set to evaluate every ``eval_steps`` on.
    """
    t, e = job.training, job.evaluation
    args = dict(
        output_dir=str(checkpoint_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=e.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=IntervalStrategy.STEPS if eval_set and e.eval_steps is not None else IntervalStrategy.NO,
        eval_steps=e.eval_steps,
        bf16=dtype == torch.bfloat16,
        optim="paged_adamw_32bit" if (place.device == "cuda" and job.model.quantization != "none") else "adamw_torch",
        dataloader_pin_memory=place.device == "cuda",
        dataloader_num_workers=0,
        use_cpu=place.device == "cpu",
        ddp_backend="gloo" if place.device == "cpu" and place.world_size > 1 else None,
        ddp_timeout=launch.DDP_TIMEOUT_S,
        **FIXED_RUNTIME_TRAINING_ARGS,
    )
    if place.strategy == "fsdp":
        # accelerate's FSDP2 (fully_shard) wraps each decoder layer (the model's _no_split_modules).
        args.update(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "fsdp_version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "reshard_after_forward": True,
                "cpu_ram_efficient_loading": False,
                "state_dict_type": "SHARDED_STATE_DICT",
            },
        )
    if job.privacy.dp_enabled:
        # One Poisson batch is one optimizer step (the accountant's unit), so the
        # logical batch is drawn whole; clipping is per sample, inside the DPOptimizer.
        args.update(
            per_device_train_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps,
            gradient_accumulation_steps=1,
            max_grad_norm=0.0,
            # The Poisson sampler resumes its own batch sequence from the checkpoint.
            ignore_data_skip=True,
        )
        if not job.privacy.dp_log_train_metrics:
            args["include_num_input_tokens_seen"] = "no"  # token counts of private batches, without noise
    args.update(overrides)
    return TrainingArguments(**args)


def collator(job: JobSpec, tokenizer, place: Placement):
    """Padding-free packing, or dynamic padding (to a multiple of 8 on GPUs, for tensor cores)."""
    if job.training.packing:
        return data.PackingCollator()
    return data.PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if place.device == "cuda" else None)


def build_trainer(
    job: JobSpec, model, tokenizer, datasets: data.Datasets, args: TrainingArguments, place: Placement, callbacks: list
) -> Trainer:
    """The HF Trainer, or the DP-SGD trainer (``dp.OpacusDPTrainer``) for a DP job, with loraflow's
    collator, eval metrics and callbacks."""
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        data_collator=collator(job, tokenizer, place),
        processing_class=tokenizer,
        callbacks=callbacks,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        compute_metrics=compute_metrics,
    )
    if job.privacy.dp_enabled:
        from loraflow_trainer.dp import OpacusDPTrainer

        trainer = OpacusDPTrainer(privacy=job.privacy, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    # With tqdm off the Trainer prints raw log dicts; LineLogCallback prints them as lines.
    trainer.remove_callback(PrinterCallback)
    return trainer


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a
    checkpoint cut short by a kill lacks it and is skipped rather than resumed from."""
    if not checkpoint_dir.exists():
        return None
    complete = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    partial = sorted(p.name for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p not in complete)
    if partial:
        progress.emit("skip_incomplete_checkpoints", checkpoints=partial)
    if not complete:
        return None
    newest = str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1])))
    progress.emit("resume", checkpoint=newest)
    return newest


def fit(trainer: Trainer, stop: StopOnSignalCallback, resume_from: str | None = None):
    """Run the training loop; return (``Trainer.train``'s output, seconds in it).

    A SIGTERM inside the loop checkpoints (``stop``), then surfaces here as an interrupt.
    """
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            "out of memory while training; lower per_device_train_batch_size or max_seq_length, "
            "enable gradient_checkpointing, or use quantization=4bit"
        ) from None
    finally:
        stop.restore()
    if stop.signalled is not None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(stop.signalled).name}; checkpoint saved")
    return output, time.perf_counter() - started
