"""HuggingFace Trainer backend for LoRA / QLoRA / DP-SGD fine-tuning.

Modelled on NeMo Safe Synthesizer's ``HuggingFaceBackend``: a ``TrainingBackend`` base with
the lifecycle, and ``HuggingFaceBackend.train()`` reading as the list of its steps. The HF
Trainer does the training loop; loraflow extends it at its seams: the collators in
``data``, a line-per-event logging callback, a stop-on-SIGTERM callback, and ``dp`` for
DP-SGD with Opacus.
"""

from __future__ import annotations

import abc
import gc
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import IntervalStrategy, set_seed
from transformers.utils import logging as hf_logging

from loraflow_trainer import base_model, launch, progress
from loraflow_trainer import data as data_mod
from loraflow_trainer.callbacks import LineLogCallback, StopOnSignalCallback
from loraflow_trainer.errors import ModelNotFoundError, OutOfMemoryError
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

SUCCESS_MARKER = "_SUCCESS"


class TrainingBackend(abc.ABC):
    """The lifecycle every loraflow backend implements."""

    def __init__(self, job: JobSpec, job_dir: Path):
        self.job = job
        self.job_dir = Path(job_dir).resolve()
        self.output_dir = job.resolve(job.output_dir, self.job_dir)
        self.results: dict[str, Any] = {}

    @abc.abstractmethod
    def prepare_config(self, add_max_memory: bool = True, **kwargs) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_model(self, **model_args) -> None: ...

    @abc.abstractmethod
    def maybe_quantize(self, **quant_params) -> None: ...

    @abc.abstractmethod
    def prepare_training_data(self) -> None: ...

    @abc.abstractmethod
    def prepare_params(self, **training_args) -> None: ...

    @abc.abstractmethod
    def train(self, **training_args) -> dict[str, Any]: ...

    @abc.abstractmethod
    def save_model(self) -> Path: ...

    @abc.abstractmethod
    def teardown(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, "job_dir": str(self.job_dir), "output_dir": str(self.output_dir)}

    def info(self) -> dict[str, Any]:
        """Report what this run is (the first event of each attempt) and return it."""
        summary = self.describe()
        progress.emit("info", **summary)
        return summary


class HuggingFaceBackend(TrainingBackend):
    """LoRA/QLoRA/DP-SGD on ``AutoModelForCausalLM`` with the HF Trainer."""

    def __init__(self, job: JobSpec, job_dir: Path):
        super().__init__(job, job_dir)
        self.model = None
        self.tokenizer = None
        self.trainer: Trainer | None = None
        self.train_dataset: data_mod.ExampleDataset | None = None
        self.eval_dataset: data_mod.ExampleDataset | None = None
        self.model_args: dict[str, Any] = {}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Under torchrun each rank owns one device (LOCAL_RANK); rank 0 alone writes outputs.
        self.local_rank = launch.local_rank()
        self.world_size = launch.world_size()
        self.is_main = launch.is_main_process()
        self.strategy = launch.strategy(job, self.world_size)
        self.log_cb = LineLogCallback()
        self.signal_cb: StopOnSignalCallback | None = None
        self.samples_before: list[str] = []
        self.sample_prompts: list[str] = []
        self.privacy_report: dict[str, float] = {}
        self._torn_down = False
        # Progress bars write carriage returns, which read as one endless line in docker logs.
        hf_logging.disable_progress_bar()

    # -- paths ---------------------------------------------------------------------

    @property
    def base_model_dir(self) -> Path | None:
        """The base model as a local directory, or None for a hub id."""
        if not self.job.is_local_model(self.job_dir):
            return None
        return self.job.resolve(self.job.model.base_model, self.job_dir)

    @property
    def placement(self) -> torch.device:
        """This process's device: its own GPU under torchrun (LOCAL_RANK), else the CPU."""
        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # -- steps -----------------------------------------------------------------------

    def prepare_config(self, add_max_memory: bool = True, **kwargs) -> dict[str, Any]:
        """Arguments for ``from_pretrained``: dtype, RoPE scaling, quantization, memory cap."""
        m = self.job.model
        source = str(self.base_model_dir or m.base_model)
        if self.base_model_dir is not None and not (self.base_model_dir / "config.json").exists():
            raise ModelNotFoundError(
                f"base model {self.base_model_dir} has no config.json; point base_model at a saved HF model "
                "directory (mounted under /models in the container) or a hub id"
            )
        try:
            config = AutoConfig.from_pretrained(source, revision=m.model_revision, trust_remote_code=m.trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(
                f"base model {m.base_model!r} could not be loaded ({str(exc).splitlines()[0][:160]}); "
                "check the name, or pre-download it into the model cache when the hub is offline"
            ) from None
        if m.rope_scaling_factor:
            rope = dict(getattr(config, "rope_parameters", None) or {})
            rope.update({"rope_type": "linear", "factor": float(m.rope_scaling_factor)})
            config.rope_parameters = rope
        args: dict[str, Any] = {
            "config": config,
            "revision": m.model_revision,
            "trust_remote_code": m.trust_remote_code,
            "dtype": self._dtype(),
        }
        if m.quantization != "none":
            args["quantization_config"] = self._bnb_config()
            args["device_map"] = {"": self.local_rank if self.device == "cuda" else "cpu"}
        if add_max_memory and self.device == "cuda":
            free, _total = torch.cuda.mem_get_info(self.local_rank)
            args.setdefault("max_memory", {self.local_rank: int(free * 0.9)})
        args.update(kwargs)
        self.model_args = args
        return args

    def load_model(self, **model_args) -> None:
        source = str(self.base_model_dir or self.job.model.base_model)
        args = {**(self.model_args or self.prepare_config()), **model_args}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=self.job.model.model_revision)
            self.model = AutoModelForCausalLM.from_pretrained(source, **args)
        except OSError as exc:
            raise ModelNotFoundError(
                f"base model {self.job.model.base_model!r} could not be loaded ({str(exc).splitlines()[0][:160]})"
            ) from None
        if self.tokenizer.pad_token_id is None:
            # Llama-style tokenizers ship without a pad token; eos is the usual stand-in.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.job.model.quantization == "none" and self.strategy != "fsdp":  # FSDP places the shards itself
            self.model.to(self.placement)
        self.model.config.use_cache = False

    def maybe_quantize(self, **quant_params) -> None:
        """Wrap the model with LoRA; k-bit models are first prepared for training."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        lora = self.job.lora
        gc_on = self.job.training.gradient_checkpointing
        if self.job.model.quantization != "none":
            self.model = prepare_model_for_kbit_training(
                self.model,
                use_gradient_checkpointing=gc_on,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif gc_on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        config = LoraConfig(
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.lora_target_modules,
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            **quant_params,
        )
        # LoRA's A matrices come from torch's RNG, which is seeded per process at random: seed it,
        # so one seed gives one initial adapter (and 1 or N processes start from the same one).
        set_seed(self.job.training.seed)
        self.model = get_peft_model(self.model, config)

    def prepare_training_data(self) -> None:
        d = self.job.data
        train_path = self.job.resolve(d.train_path, self.job_dir)
        self.train_dataset = data_mod.ExampleDataset(data_mod.load_examples(self.job, train_path, self.tokenizer))
        if d.eval_path:
            eval_path = self.job.resolve(d.eval_path, self.job_dir)
            self.eval_dataset = data_mod.ExampleDataset(data_mod.load_examples(self.job, eval_path, self.tokenizer))
        prompt_source = self.job.resolve(d.eval_path or d.train_path, self.job_dir)
        self.sample_prompts = data_mod.prompts_for_samples(
            self.job, prompt_source, self.tokenizer, self.job.evaluation.num_sample_generations
        ) if d.eval_path or not self.job.privacy.dp_enabled else []  # DP: never copy training prompts into samples.jsonl
        progress.emit("data", train_examples=len(self.train_dataset), train_tokens=self.train_dataset.num_tokens(),
                      eval_examples=len(self.eval_dataset) if self.eval_dataset else 0)

    def training_arguments(self, **overrides) -> TrainingArguments:
        t, e = self.job.training, self.job.evaluation
        eval_on = self.eval_dataset is not None and e.eval_steps is not None
        args = dict(
            output_dir=str(self.checkpoint_dir),
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
            eval_strategy=IntervalStrategy.STEPS if eval_on else IntervalStrategy.NO,
            eval_steps=e.eval_steps,
            bf16=self._dtype() == torch.bfloat16,
            optim="paged_adamw_32bit" if (self.device == "cuda" and self.job.model.quantization != "none") else "adamw_torch",
            dataloader_pin_memory=self.device == "cuda",
            dataloader_num_workers=0,
            use_cpu=self.device == "cpu",
            ddp_backend="gloo" if self.device == "cpu" and self.world_size > 1 else None,
            ddp_timeout=launch.DDP_TIMEOUT_S,
            **FIXED_RUNTIME_TRAINING_ARGS,
        )
        if self.strategy == "fsdp":
            # accelerate's FSDP2 (fully_shard) wraps each decoder layer (the model's _no_split_modules).
            args.update(fsdp="full_shard auto_wrap", fsdp_config={
                "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                "cpu_ram_efficient_loading": False, "state_dict_type": "SHARDED_STATE_DICT",
            })
        if self.job.privacy.dp_enabled:
            # One Poisson batch is one optimizer step (the accountant's unit), so the
            # logical batch is drawn whole; clipping is per sample, inside the DPOptimizer.
            args.update(
                per_device_train_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps,
                gradient_accumulation_steps=1,
                max_grad_norm=0.0,
                # The Poisson sampler resumes its own batch sequence from the checkpoint.
                ignore_data_skip=True,
            )
            if not self.job.privacy.dp_log_train_metrics:
                args["include_num_input_tokens_seen"] = "no"  # token counts of private batches, without noise
        args.update(overrides)
        return TrainingArguments(**args)

    def prepare_params(self, **training_args) -> None:
        """Build the Trainer (or the DP trainer) with loraflow's collator and callbacks."""
        collator = (
            data_mod.PackingCollator()
            if self.job.training.packing
            else data_mod.PaddingCollator(self.tokenizer.pad_token_id, pad_to_multiple_of=8 if self.device == "cuda" else None)
        )
        self.signal_cb = StopOnSignalCallback()
        kwargs = dict(
            model=self.model,
            args=self.training_arguments(**training_args),
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            data_collator=collator,
            processing_class=self.tokenizer,
            callbacks=[self.log_cb, self.signal_cb],
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            compute_metrics=compute_metrics,
        )
        if self.job.privacy.dp_enabled:
            from loraflow_trainer.dp import OpacusDPTrainer

            self.trainer = OpacusDPTrainer(privacy=self.job.privacy, **kwargs)
        else:
            self.trainer = Trainer(**kwargs)
        # With tqdm off the Trainer prints raw log dicts; LineLogCallback prints them as JSON.
        self.trainer.remove_callback(PrinterCallback)

    def train(self, **training_args) -> dict[str, Any]:
        """Load, wrap, tokenize, sample, train (resuming), evaluate, sample, save."""
        self.info()
        self.prepare_config()
        self.load_model()
        self.maybe_quantize()
        self.prepare_training_data()
        self.prepare_params(**training_args)
        self.samples_before = self.generate_samples() if self.is_main else []
        output, runtime = self.fit(resume_from=self.last_checkpoint())
        self.results = self._metrics(output, runtime)
        self.results.update(self.evaluate())  # every rank: eval batches are sharded across them
        if self.job.privacy.dp_enabled:
            self.results.update(self.trainer.privacy_report())
            self.results = self.trainer.public_metrics(self.results)
        progress.emit("metrics", **self.results)
        if self.strategy == "fsdp":
            self._gather_fsdp_model()  # a collective: every rank, before rank 0 writes alone
        if self.is_main:
            self.save_model()
        return self.results

    def last_checkpoint(self) -> str | None:
        """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a
        checkpoint cut short by a kill lacks it and is skipped rather than resumed from."""
        if not self.checkpoint_dir.exists():
            return None
        complete = [p for p in self.checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        partial = sorted(p.name for p in self.checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p not in complete)
        if partial:
            progress.emit("skip_incomplete_checkpoints", checkpoints=partial)
        if not complete:
            return None
        newest = str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1])))
        progress.emit("resume", checkpoint=newest)
        return newest

    def fit(self, resume_from: str | None = None):
        """Run the Trainer loop; a SIGTERM inside it checkpoints, then surfaces as an interrupt."""
        started = time.perf_counter()
        try:
            output = self.trainer.train(resume_from_checkpoint=resume_from)
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(
                "out of memory while training; lower per_device_train_batch_size or max_seq_length, "
                "enable gradient_checkpointing, or use quantization=4bit"
            ) from None
        finally:
            self.signal_cb.restore()
        if self.signal_cb.signalled is not None:
            raise KeyboardInterrupt(f"stopped by {signal.Signals(self.signal_cb.signalled).name}; checkpoint saved")
        return output, time.perf_counter() - started

    def evaluate(self) -> dict[str, float]:
        """Eval loss and perplexity on eval_path (empty when the job has no eval set)."""
        if self.eval_dataset is None:
            return {}
        ev = self.trainer.evaluate()
        metrics = {"eval_loss": float(ev["eval_loss"]), "perplexity": float(math.exp(min(ev["eval_loss"], 50.0)))}
        if "eval_token_accuracy" in ev:
            metrics["eval_token_accuracy"] = float(ev["eval_token_accuracy"])
        return metrics

    def generate_samples(self) -> list[str]:
        """Greedy completions of the sample prompts (left padding, so batches generate correctly)."""
        if not self.sample_prompts:
            return []
        model = self._unwrapped_model()
        tok = self.tokenizer
        ids = data_mod.encode_prompts(self.job, self.sample_prompts, tok)
        padded, mask, width = data_mod.left_pad(ids, tok.pad_token_id)
        input_ids, attention_mask = torch.tensor(padded, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    max_new_tokens=self.job.evaluation.sample_max_new_tokens, do_sample=False,
                    pad_token_id=tok.pad_token_id, use_cache=True,
                )
            return tok.batch_decode(out[:, width:], skip_special_tokens=True)
        finally:
            model.train(was_training)

    def save_model(self) -> Path:
        """Write adapter/, model/, metrics, metadata, samples and schema; ``_SUCCESS`` last.

        Everything is written under a staging directory and renamed into place, and the
        marker goes last, so a crash never leaves an output that looks complete.
        """
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / SUCCESS_MARKER).unlink(missing_ok=True)
        staging = out / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()

        try:
            model = self._unwrapped_model()
            model.save_pretrained(staging / "adapter")
            self.tokenizer.save_pretrained(staging / "adapter")
            self._save_mlflow_model(model, staging / "model")

            samples_after = self.generate_samples()
            with (staging / "samples.jsonl").open("w") as f:
                for prompt, before, after in zip(self.sample_prompts, self.samples_before or [""] * len(samples_after), samples_after):
                    f.write(json.dumps({"prompt": prompt, "before": before, "after": after}) + "\n")
            (staging / "metrics.json").write_text(json.dumps(self.results, indent=2))
            if self.job.privacy.dp_enabled:
                from loraflow_trainer.dp import ACCOUNTING_FILE

                (staging / ACCOUNTING_FILE).write_text(json.dumps(self.trainer.accounting_record(), indent=2))
            (staging / "dataset_schema.json").write_text(json.dumps(self._dataset_schema(), indent=2))
            (staging / "metadata.json").write_text(json.dumps(self._metadata(staging), indent=2))

            for item in sorted(staging.iterdir()):
                target = out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                item.replace(target)
            staging.rmdir()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a half-written output must not linger (or fill the disk)
            raise
        marker = out / f"{SUCCESS_MARKER}.tmp"
        marker.write_text(json.dumps({"completed_at": time.time()}))
        marker.replace(out / SUCCESS_MARKER)
        progress.emit("saved", output_dir=str(out))
        return out

    def teardown(self) -> None:
        """Free the trainer, the model and accelerator memory. Safe to call more than once."""
        if self.trainer is not None:
            try:
                self.trainer.accelerator.free_memory()
            except Exception:  # best effort: teardown must not raise
                pass
        if self.signal_cb is not None:
            self.signal_cb.restore()
        self.trainer = None
        self.model = None
        self.train_dataset = self.eval_dataset = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._torn_down = True

    def describe(self) -> dict[str, Any]:
        summary = super().describe()
        summary.update({
            "device": self.device,
            "base_model": self.job.model.base_model,
            "quantization": self.job.model.quantization,
            "dp_enabled": self.job.privacy.dp_enabled,
            "trainable_parameters": _trainable(self.model) if self.model is not None else None,
        })
        return summary

    # -- helpers ---------------------------------------------------------------------

    def _dtype(self) -> torch.dtype:
        want = self.job.model.torch_dtype
        if want == "auto":
            return torch.bfloat16 if (self.device == "cuda" and torch.cuda.is_bf16_supported()) else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[want]

    def _bnb_config(self) -> BitsAndBytesConfig:
        if self.job.model.quantization == "4bit":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self._dtype(),
            )
        return BitsAndBytesConfig(load_in_8bit=True)

    def _gather_fsdp_model(self) -> None:
        """FSDP: gather the trained weights from every rank (a collective), then give rank 0 an
        unsharded copy to sample from and save (a sharded model cannot run on one rank alone)."""
        state = self.trainer.accelerator.get_state_dict(self.trainer.model)  # full tensors, on rank 0
        if not self.is_main:
            return
        from peft import get_peft_model

        args = {k: v for k, v in self.model_args.items() if k not in ("device_map", "max_memory")}
        base = AutoModelForCausalLM.from_pretrained(str(self.base_model_dir or self.job.model.base_model), **args)
        base.config.use_cache = False
        config = self.model.peft_config["default"]
        fresh = get_peft_model(base, config)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        lora_missing = [k for k in missing if "lora_" in k]
        if lora_missing or unexpected:
            raise RuntimeError(f"FSDP state dict does not fit the LoRA model (missing {lora_missing[:3]}, unexpected {unexpected[:3]})")
        self.model = fresh.to(self.placement)

    def _unwrapped_model(self):
        model = self.model
        return getattr(model, "_module", model)  # Opacus GradSampleModule wraps the PeftModel

    def _metrics(self, output, runtime: float) -> dict[str, Any]:
        state = self.trainer.state
        tokens = int(state.num_input_tokens_seen)
        session_tokens = tokens - self.log_cb.tokens_at_start
        losses = self.log_cb.losses
        if self.device == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = {
            "train_loss": float(output.training_loss),
            # Cumulative over attempts; the rate is this attempt's tokens over its own runtime.
            "train_tokens": tokens,
            "tokens_per_second": session_tokens / runtime if runtime > 0 else 0.0,
            "train_runtime_s": runtime,
            "peak_memory_mb": peak_mb,
            "global_step": int(state.global_step),
            "trainable_parameters": _trainable(self.model),
        }
        if losses:  # a resumed run that was already finished logs no step
            metrics.update(first_train_loss=losses[0], final_train_loss=losses[-1])
        metrics.update(self._device_metrics(metrics["tokens_per_second"], runtime))
        return metrics

    def _device_metrics(self, tokens_per_second: float, runtime: float) -> dict[str, Any]:
        """What the run trained on and its batch: the cost tags of the registered version read these."""
        t = self.job.training
        per_step = self.trainer.args.per_device_train_batch_size * self.trainer.args.gradient_accumulation_steps
        name = torch.cuda.get_device_name(self.local_rank) if self.device == "cuda" else "cpu"
        return {
            "device_name": name,
            "device_count": self.world_size,  # one process per device
            "distributed": self.strategy,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            # Examples per optimizer step: per device x accumulation x processes (DP draws the
            # logical batch whole, so its per-device size already holds the accumulation).
            "effective_batch_size": per_step * self.world_size,
            "device_seconds": runtime * self.world_size,
            "gpu_seconds": runtime * self.world_size if self.device == "cuda" else 0.0,
            "tokens_per_second_per_device": tokens_per_second / self.world_size,
        }

    def _dataset_schema(self) -> dict[str, Any]:
        d = self.job.data
        cols = {"text": [d.text_column], "prompt_completion": [d.prompt_column, d.completion_column],
                "chat": [d.messages_column]}[d.data_format]
        return {
            "data_format": d.data_format,
            "columns": [{"name": c, "type": "string"} for c in cols],
            "train_examples": len(self.train_dataset) if self.train_dataset else 0,
            "eval_examples": len(self.eval_dataset) if self.eval_dataset else 0,
            "max_seq_length": self.job.training.max_seq_length,
            "loss_on": "completion" if self.job.completion_only else "all",
        }

    def _metadata(self, staging: Path) -> dict[str, Any]:
        import peft
        import transformers

        versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__}
        for name in ("bitsandbytes", "opacus", "mlflow"):
            try:
                versions[name] = __import__(name).__version__
            except Exception:  # optional at runtime: record what is there
                pass
        checksums = {
            str(p.relative_to(staging)): base_model.file_sha256(p)
            for sub in ("adapter", "model") for p in sorted((staging / sub).rglob("*")) if p.is_file()
        }
        from loraflow_trainer import __version__

        return {
            "base_model": self.job.model.base_model,
            "base_model_dir": str(self.base_model_dir) if self.base_model_dir else None,
            "base_model_ref": self._base_ref(),
            "code": _code_provenance(__version__),
            "spec_hash": self.job.spec_hash(),
            "data_fingerprint": self.job.data_fingerprint,
            "labels": self.job.labels,
            "loraflow_trainer": __version__,
            "versions": versions,
            "device": self.device,
            "checksums": checksums,
        }

    def _save_mlflow_model(self, model, path: Path) -> None:
        """An MLflow transformers-flavour model holding the adapter and a reference to the base."""
        import mlflow
        from mlflow.models import infer_signature

        signature = infer_signature(
            model_input=["prompt"], model_output=["completion"],
            params={"max_new_tokens": self.job.evaluation.sample_max_new_tokens, "do_sample": False, "temperature": 1.0},
        )
        import peft
        import transformers

        pip = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
               f"peft=={peft.__version__}", f"mlflow-skinny=={mlflow.__version__}"]
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": self.tokenizer},
            path=str(path),
            task="text-generation",
            signature=signature,
            pip_requirements=pip,
            # Serve the completion, not the prompt echoed back in front of it.
            model_config={"return_full_text": False},
            base_model_path=str(self.base_model_dir) if self.base_model_dir else None,
            metadata={"loraflow.base_model": self.job.model.base_model, "loraflow.spec_hash": self.job.spec_hash(),
                      base_model.REF_KEY: self._base_ref()},
        )
        if self.base_model_dir is not None:
            _bundle_base_resolver(path)

    def _base_ref(self) -> dict[str, Any]:
        """The base as a portable reference (cache name + weights hash, or hub id + commit); hashed once."""
        if getattr(self, "_base_ref_value", None) is None:
            commit = getattr(getattr(self.model, "config", None), "_commit_hash", None) if self.base_model_dir is None else None
            self._base_ref_value = base_model.reference(self.job.model.base_model, self.base_model_dir,
                                                        self.job.model.model_revision, commit)
        return self._base_ref_value


def _bundle_base_resolver(model_path: Path) -> None:
    """Point the MLflow model's pyfunc loader at a copy of ``base_model`` inside the model.

    The transformers flavour would load the base from the absolute path it was trained at
    (``/models/<name>`` in the container); the bundled loader resolves the recorded
    reference on the loading host instead, so ``mlflow.pyfunc.load_model`` works there.
    The transformers flavour itself is left as MLflow wrote it.
    """
    from mlflow.models import Model
    from mlflow.pyfunc import CODE, MAIN

    code = model_path / "code"
    code.mkdir(exist_ok=True)
    shutil.copyfile(base_model.__file__, code / f"{base_model.BUNDLED_MODULE}.py")
    mlmodel = Model.load(str(model_path / "MLmodel"))
    mlmodel.flavors["python_function"].update({MAIN: base_model.BUNDLED_MODULE, CODE: "code"})
    mlmodel.save(str(model_path / "MLmodel"))


def _code_provenance(trainer_version: str) -> dict[str, str | None]:
    """What trained this version: the trainer's version, the git commit of its source, the image."""
    commit = os.environ.get("LORAFLOW_GIT_COMMIT")
    if not commit:
        import subprocess

        try:
            commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):  # no git in the image: the image digest identifies the code
            commit = None
    return {"loraflow_trainer": trainer_version, "git_commit": commit,
            "image": os.environ.get("LORAFLOW_IMAGE") or None, "image_digest": os.environ.get("LORAFLOW_IMAGE_DIGEST") or None}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
