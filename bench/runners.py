"""The training setups the benchmarks compare, each run on the same model, data and LoRA config.

- ``loraflow``: loraflow's own recipe on a job spec: ``recipe.setup`` (the model, data and
  Trainer stages), then its Trainer's ``train()``.
- ``hf_padding``: baseline (b), the seeds' recipe: plain HF ``Trainer`` + PEFT LoRA,
  tokenized with ``datasets.map``, ``DataCollatorForSeq2Seq`` padding each batch to its
  longest example.
- ``trl``: TRL ``SFTTrainer`` on a prompt/completion dataset, with its defaults, with
  ``padding_free=True``, or with ``packing=True`` (BFD packing, padding-free).

Every run is measured the same way: a forward pre-hook on the trained model counts real
(non-pad) tokens, and a callback stops training once a token budget is reached, so each
setup trains on the same number of tokens whatever its batch shape.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Workload:
    model_dir: Path
    train_path: Path  # prompt/completion JSONL
    eval_rows: list[dict[str, str]]
    batch_size: int = 8  # examples per optimizer step (padded setups and loraflow packing)
    max_seq_length: int = 512
    token_budget: int = 40_000  # non-pad training tokens per run
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42
    quantization: str = "none"  # none | 4bit
    mean_tokens: float = 0.0  # mean example length in tokens, to size TRL's packed batches
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_steps: int = 100_000


@dataclass
class Meter:
    """Counts tokens seen by the model's forward passes and timestamps each optimizer step."""

    budget: int
    tokens: int = 0
    padded_tokens: int = 0
    loss_tokens: int = 0
    active: bool = True
    t0: float = 0.0
    c0: float = 0.0
    steps: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds at each step end
    losses: list[float] = field(default_factory=list)

    def pre_hook(self, module, args, kwargs):
        if not self.active:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        self.padded_tokens += int(ids.numel())
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        if labels is not None:
            self.loss_tokens += int((labels != IGNORE_INDEX).sum())


def _callback(meter: Meter):
    from transformers import TrainerCallback

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.t0 = time.perf_counter()
            meter.c0 = time.process_time()

        def on_step_end(self, args, state, control, **kw):
            meter.steps.append((time.perf_counter() - meter.t0, meter.tokens))
            meter.cpu.append(time.process_time() - meter.c0)
            if meter.tokens >= meter.budget:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    return MeterCallback()


def quiet_libraries() -> None:
    """No progress bars or advisory warnings: the benchmark prints its own table."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokenize_pc(tokenizer, rows: list[dict[str, str]], max_len: int) -> list[dict[str, list[int]]]:
    """bos + prompt + completion + eos, loss on the completion only (the baseline's and the eval's tokenization)."""
    p = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    c = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for pi, ci in zip(p, c, strict=True):
        ids = bos + pi + ci + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * (len(bos) + len(pi)) + ci + [tokenizer.eos_token_id]
        out.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return out


def eval_loss(model, tokenizer, rows: list[dict[str, str]], max_len: int) -> float:
    """Token-weighted completion loss on held-out rows, one example per forward (no padding at all)."""
    import torch

    if not rows:
        return float("nan")
    model.eval()
    dev = next(p for p in model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in tokenize_pc(tokenizer, rows, max_len):
            ids = torch.tensor([ex["input_ids"]], device=dev)
            labels = torch.tensor([ex["labels"]], device=dev)
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if k == 0:
                continue
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            total += float(loss) * k
            n += k
    model.train()
    return total / max(n, 1)


def _lora_config(w: Workload):
    from peft import LoraConfig

    return LoraConfig(
        r=w.lora_r,
        lora_alpha=w.lora_alpha,
        lora_dropout=w.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _load_hf_model(w: Workload):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(w.model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if w.bf16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if w.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0 if _device() == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, **kwargs)
    if w.quantization == "none":
        model.to(_device())
    model.config.use_cache = False
    return model, tok


def _prepare_kbit(model, w: Workload):
    from peft import prepare_model_for_kbit_training

    if w.quantization != "none":
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=w.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if w.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _common_args(w: Workload, out: str) -> dict[str, Any]:
    dev = _device()
    return dict(
        output_dir=out,
        per_device_train_batch_size=w.batch_size,
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        max_steps=w.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=w.seed,
        data_seed=w.seed,
        disable_tqdm=True,
        use_cpu=dev == "cpu",
        bf16=w.bf16,
        optim="paged_adamw_32bit" if (dev == "cuda" and w.quantization != "none") else "adamw_torch",
        dataloader_num_workers=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )


# -- setups --------------------------------------------------------------------------------------


def build_loraflow(w: Workload, tmp: Path, packing: bool):
    from loraflow_trainer import launch, recipe, spec

    body = {
        "model": {
            "base_model": str(w.model_dir),
            "quantization": w.quantization,
            "torch_dtype": "bfloat16" if w.bf16 else "float32",
        },
        "data": {"train_path": str(w.train_path), "data_format": "prompt_completion"},
        "lora": {"lora_r": w.lora_r, "lora_alpha": w.lora_alpha, "lora_dropout": w.lora_dropout},
        "training": {
            "per_device_train_batch_size": w.batch_size,
            "learning_rate": w.learning_rate,
            "lr_scheduler_type": "constant",
            "max_steps": w.max_steps,
            "max_seq_length": w.max_seq_length,
            "packing": packing,
            "loss_on": "completion",
            "seed": w.seed,
            "logging_steps": 1,
            "save_steps": 10**9,
            "gradient_checkpointing": w.gradient_checkpointing,
        },
        "evaluation": {"num_sample_generations": 0},
        "output_dir": str(tmp / "output"),
    }
    job = spec.validate(body)
    built = recipe.setup(job, tmp, tmp / "output", launch.placement(job))
    return built.trainer, built.tokenizer, lambda: recipe.teardown(built)


def build_hf_padding(w: Workload, tmp: Path):
    import datasets
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = _load_hf_model(w)
    model = get_peft_model(_prepare_kbit(model, w), _lora_config(w))
    raw = datasets.load_dataset("json", data_files=str(w.train_path), split="train")

    def encode(batch):
        rows = [{"prompt": p, "completion": c} for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
        enc = tokenize_pc(tok, rows, w.max_seq_length)
        return {
            "input_ids": [e["input_ids"] for e in enc],
            "labels": [e["labels"] for e in enc],
            "attention_mask": [[1] * len(e["input_ids"]) for e in enc],
        }

    ds = raw.map(encode, batched=True, remove_columns=raw.column_names)
    collator = DataCollatorForSeq2Seq(
        tok, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if _device() == "cuda" else None
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(w, str(tmp / "hf"))),
        train_dataset=ds,
        data_collator=collator,
        processing_class=tok,
    )
    return trainer, tok, None


def build_trl(w: Workload, tmp: Path, mode: str):
    """mode: default | padding_free | packing."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tok = _load_hf_model(w)
    model = _prepare_kbit(model, w) if w.quantization != "none" else model
    ds = datasets.load_dataset("json", data_files=str(w.train_path), split="train")
    args = _common_args(w, str(tmp / "trl"))
    extra: dict[str, Any] = {
        "max_length": w.max_seq_length,
        "completion_only_loss": True,
        "gradient_checkpointing": w.gradient_checkpointing,
    }
    if mode == "packing":
        # Packed rows hold ~max_length tokens each: fewer rows per step keep the tokens per step equal.
        extra["packing"] = True
        args["per_device_train_batch_size"] = max(1, round(w.batch_size * w.mean_tokens / w.max_seq_length))
    elif mode == "padding_free":
        extra["padding_free"] = True
        extra["max_length"] = None  # TRL enforces no max_length without packing; the data is pre-truncated
    cfg = SFTConfig(**args, **extra)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=_lora_config(w))
    return trainer, tok, None


# Each builds (trainer, tokenizer, teardown or None) for a workload in a scratch directory.
SETUPS = {
    "loraflow": lambda w, tmp: build_loraflow(w, tmp, packing=False),
    "loraflow_packing": lambda w, tmp: build_loraflow(w, tmp, packing=True),
    "hf_padding": build_hf_padding,
    "trl_default": lambda w, tmp: build_trl(w, tmp, "default"),
    "trl_padding_free": lambda w, tmp: build_trl(w, tmp, "padding_free"),
    "trl_packing": lambda w, tmp: build_trl(w, tmp, "packing"),
}


def run(setup: str, w: Workload, quiet: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Build one setup from scratch, train it to the token budget, and measure it."""
    import torch
    from transformers import PrinterCallback, set_seed

    started = time.perf_counter()
    set_seed(w.seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sink = io.StringIO()
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{setup}-") as tmpdir,
        contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext(),
    ):
        trainer, tok, teardown = SETUPS[setup](w, Path(tmpdir))
        trainer.remove_callback(PrinterCallback)
        meter = Meter(w.token_budget)
        trainer.add_callback(_callback(meter))
        handle = trainer.model.register_forward_pre_hook(meter.pre_hook, with_kwargs=True)
        setup_s = time.perf_counter() - started
        trainer.train()
        _sync()
        meter.active = False
        handle.remove()
        peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        loss = eval_loss(trainer.model, tok, w.eval_rows, w.max_seq_length) if evaluate else float("nan")
        if teardown is not None:
            teardown()
    return summarise(setup, w, meter, setup_s, loss, peak_cuda_mb)


def summarise(setup: str, w: Workload, m: Meter, setup_s: float, loss: float, peak_cuda_mb) -> dict[str, Any]:
    # Steady-state rate: from the end of step 1 (warm-up, lazy init) to the last step.
    (t1, k1), (tn, kn) = m.steps[0], m.steps[-1]
    rate = (kn - k1) / (tn - t1) if len(m.steps) > 1 and tn > t1 else kn / max(tn, 1e-9)
    reach = next((t for t, k in m.steps if k >= w.token_budget), tn)
    # CPU seconds of this process: on a shared machine they do not count the time spent
    # waiting for a core, so they compare setups more steadily than wall time (1 thread: no spin-waits).
    c1, cn = m.cpu[0], m.cpu[-1]
    cpu_rate = (kn - k1) / (cn - c1) if len(m.cpu) > 1 and cn > c1 else kn / max(cn, 1e-9)
    tail = m.losses[-max(1, len(m.losses) // 5) :] if m.losses else []
    return {
        "setup": setup,
        "steps": len(m.steps),
        "tokens": m.tokens,
        "padded_tokens": m.padded_tokens,
        "pad_fraction": 1 - m.tokens / m.padded_tokens if m.padded_tokens else 0.0,
        "loss_tokens": m.loss_tokens,
        "tokens_per_s": rate,
        "time_to_budget_s": reach,
        "tokens_per_cpu_s": cpu_rate,
        "cpu_s_to_budget": next(
            (c for c, (_t, k) in zip(m.cpu, m.steps, strict=True) if k >= w.token_budget), m.cpu[-1]
        ),
        "setup_s": setup_s,
        "train_loss_last20pct": sum(tail) / len(tail) if tail else float("nan"),
        "first_loss": m.losses[0] if m.losses else float("nan"),
        "eval_loss": loss,
        "peak_cuda_mb": peak_cuda_mb,
    }


def mean_tokens(model_dir: Path, rows: list[dict[str, str]], max_len: int) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenize_pc(tok, rows, max_len)
    return sum(len(e["input_ids"]) for e in enc) / max(len(enc), 1)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
