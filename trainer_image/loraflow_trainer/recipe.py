"""The training run as a recipe: ``run(job, job_dir)`` reads top to bottom as its steps.

Each stage lives in its own module, takes what it needs as arguments and returns what it
built: ``model`` (from_pretrained arguments, the base and tokenizer, the LoRA wrap),
``data`` (tokenized datasets and sample prompts), ``training`` (TrainingArguments, the
Trainer, resume, the loop), ``metrics`` and ``outputs`` (the staged save, ``_SUCCESS``
last). ``setup`` is the part before the loop, which the benchmarks call on their own.

What a run built is recorded in a ``Built``, so that a caller can free it afterwards
(``teardown``, also after a failure) or look inside (the tests, the benchmarks).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from loraflow_trainer import contract, data, launch, metrics, model, outputs, progress, samples, training
from loraflow_trainer.callbacks import LineLogCallback, StopOnSignalCallback
from loraflow_trainer.launch import Placement
from loraflow_trainer.spec import JobSpec

# The backend's name in the run's first event and log line (NeMo Safe Synthesizer's name for
# an HF Trainer backend, which this recipe is modelled on).
BACKEND = "HuggingFaceBackend"


@dataclass
class Built:
    """What a run built so far, stage by stage."""

    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the PeftModel (under FSDP, after the run: rank 0's unsharded copy)
    tokenizer: Any = None
    datasets: data.Datasets | None = None
    trainer: Any = None
    log: LineLogCallback = field(default_factory=LineLogCallback)
    stop: StopOnSignalCallback = field(default_factory=StopOnSignalCallback)


def output_dir(job: JobSpec, job_dir: Path) -> Path:
    return job.resolve(job.output_dir, Path(job_dir).resolve())


def run(job: JobSpec, job_dir: Path, built: Built | None = None) -> dict[str, Any]:
    """Train one job, write its outputs (rank 0 alone) and return the run's metrics."""
    built = Built() if built is None else built
    job_dir = Path(job_dir).resolve()
    out = output_dir(job, job_dir)
    place = launch.placement(job)
    hf_logging.disable_progress_bar()  # carriage returns read as one endless line in docker logs
    progress.emit("info", **describe(job, job_dir, out, place))

    setup(job, job_dir, out, place, built)
    trainer, tokenizer, datasets = built.trainer, built.tokenizer, built.datasets
    max_new = job.evaluation.sample_max_new_tokens
    before = samples.generate(built.model, tokenizer, job, datasets.sample_prompts, max_new) if place.is_main else []

    output, runtime = training.fit(trainer, built.stop, training.last_checkpoint(out / contract.CHECKPOINTS_DIR))
    results = metrics.train_metrics(job, trainer, output, runtime, built.log, built.model, place)
    results.update(metrics.eval_metrics(trainer, datasets.eval))  # every rank: eval batches are sharded across them
    if job.privacy.dp_enabled:
        results = trainer.public_metrics({**results, **trainer.privacy_report()})
    progress.emit("metrics", **results)

    if place.strategy == "fsdp":  # a collective: every rank, before rank 0 writes alone
        built.model = model.unshard(trainer, built.model, job, job_dir, built.model_kwargs, place)
    if place.is_main:
        after = samples.generate(built.model, tokenizer, job, datasets.sample_prompts, max_new)
        outputs.save(
            out,
            job,
            job_dir,
            built.model,
            tokenizer,
            results,
            samples.sample_rows(datasets.sample_prompts, before, after),
            accounting=trainer.accounting_record() if job.privacy.dp_enabled else None,
            device=place.device,
        )
    return results


def setup(job: JobSpec, job_dir: Path, out: Path, place: Placement, built: Built | None = None) -> Built:
    """The model, tokenizer, datasets and Trainer of a job, in that order, recorded in ``built``."""
    built = Built() if built is None else built
    built.model_kwargs = model.from_pretrained_kwargs(job, job_dir, place)
    base, built.tokenizer = model.load(job, job_dir, built.model_kwargs, place)
    built.model = model.apply_lora(base, job)
    built.datasets = data.build_datasets(job, job_dir, built.tokenizer)
    args = training.arguments(
        job,
        place,
        built.model_kwargs["dtype"],
        out / contract.CHECKPOINTS_DIR,
        eval_set=built.datasets.eval is not None,
    )
    built.trainer = training.build_trainer(
        job, built.model, built.tokenizer, built.datasets, args, place, callbacks=[built.log, built.stop]
    )
    return built


def teardown(built: Built) -> None:
    """Free the trainer, the model and accelerator memory, and leave the process group. Safe to call twice."""
    if built.trainer is not None:
        try:
            built.trainer.accelerator.free_memory()
        except Exception:  # best effort: teardown must not raise
            pass
    built.stop.restore()
    built.trainer = built.model = built.datasets = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def describe(job: JobSpec, job_dir: Path, out: Path, place: Placement) -> dict[str, Any]:
    """What this run is: the first event of each attempt."""
    return {
        "backend": BACKEND,
        "job_dir": str(job_dir),
        "output_dir": str(out),
        "device": place.device,
        "base_model": job.model.base_model,
        "quantization": job.model.quantization,
        "dp_enabled": job.privacy.dp_enabled,
    }
