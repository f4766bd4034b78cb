"""The job spec: the versioned contract between the Airflow side and the trainer.

This module owns the schema of ``job.json``. It imports pydantic and the standard
library only, so the Airflow side can validate and write a spec without torch, and the
trainer can read it without airflow.

Every field name is unique across sections. That lets the same word name the field
here, the trigger-form Param, the MLflow param and the docs (``flat_params``). Each field
is documented once, where it is declared: its ``title`` and the docstring under it (its
description), which the trigger form, the DAG's docs and both CLIs read (``json_schema``).

Relative paths in a spec resolve against the directory that holds ``job.json``, so one
spec works on the host and inside the container, where the workspace is mounted at a
different path.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraflow_trainer import contract
from loraflow_trainer.errors import JobSpecError

SPEC_VERSION = 1

# A hub id is "name" or "org/name" with the characters the hub allows.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")

DataFormat = Literal["text", "prompt_completion", "chat"]
Quantization = Literal["none", "4bit", "8bit"]
LossOn = Literal["all", "completion"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
TorchDtype = Literal["auto", "float32", "bfloat16", "float16"]
Distributed = Literal["auto", "ddp", "fsdp"]


class _Section(BaseModel):
    # A field's docstring is its description (pydantic reads it into the field and the JSON schema).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(_Section):
    base_model: str = Field(min_length=1, max_length=4096, title="Base model")
    """A saved HF model directory or a hub id such as org/name. In the trigger form, a directory under the model
    cache (LORAFLOW_MODELS), e.g. tiny-llama; in job.json, a path absolute or relative to job.json."""
    model_revision: str | None = Field(None, title="Model revision")
    """Hub revision (branch, tag or commit) of a hub base model."""
    torch_dtype: TorchDtype = Field("auto", title="Weights dtype")
    """Dtype of the base weights; auto picks bfloat16 on GPUs that support it, else float32."""
    quantization: Quantization = Field("none", title="Quantization")
    """none trains LoRA on full-precision weights; 4bit is QLoRA (NF4); 8bit is LLM.int8."""
    rope_scaling_factor: float | None = Field(None, ge=1.0, le=64.0, title="RoPE scaling factor")
    """Linear RoPE scaling to extend the context; empty keeps the model's own."""
    trust_remote_code: bool = Field(False, title="Trust remote code")
    """Allow model code from the hub; off unless you trust the repo."""


class DataSpec(_Section):
    train_path: str = Field(title="Training data")
    """Training data (Parquet, JSONL or CSV), relative to job.json or absolute."""
    eval_path: str | None = Field(None, title="Evaluation data")
    """Evaluation data in the same format; empty disables eval loss."""
    data_format: DataFormat = Field("text", title="Data format")
    """text (a text column), prompt_completion (prompt + completion) or chat (a messages column)."""
    text_column: str = Field("text", min_length=1, title="Text column")
    """The column of the text format's examples."""
    prompt_column: str = Field("prompt", min_length=1, title="Prompt column")
    """The prompt_completion format's prompt column."""
    completion_column: str = Field("completion", min_length=1, title="Completion column")
    """The prompt_completion format's completion column."""
    messages_column: str = Field("messages", min_length=1, title="Messages column")
    """The chat format's column: a list of {role, content} messages per example."""


class LoraSpec(_Section):
    lora_r: int = Field(16, ge=1, le=1024, title="LoRA rank (r)")
    """Rank of the low-rank update; 8-64 is typical."""
    lora_alpha: int = Field(32, ge=1, le=4096, title="LoRA alpha")
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, title="LoRA dropout")
    """Dropout on the LoRA input during training."""
    lora_target_modules: list[str] | Literal["all-linear"] = Field("all-linear", title="Target modules")
    """Module names to adapt, or all-linear."""
    use_rslora: bool = Field(False, title="rsLoRA")
    """Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)."""


# A million optimizer steps is weeks on one GPU: a larger value is a typo, not a plan.
MAX_STEPS = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's RandomState (seeded by transformers.set_seed) refuses larger seeds


class TrainingSpec(_Section):
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, title="Learning rate")
    """Peak learning rate of the scheduler."""
    num_train_epochs: float = Field(1.0, gt=0.0, le=100.0, title="Epochs")
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS, title="Max steps")
    """Stop after this many optimizer steps; -1 trains for num_train_epochs."""
    per_device_train_batch_size: int = Field(8, ge=1, le=4096, title="Batch size")
    """Examples per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, title="Gradient accumulation")
    """Steps to accumulate before an optimizer step."""
    max_seq_length: int = Field(512, ge=8, le=1_048_576, title="Max sequence length")
    """Tokens per example; the data check fails rows longer than this."""
    warmup_steps: int = Field(0, ge=0, title="Warm-up steps")
    """Linear warm-up steps."""
    lr_scheduler_type: Scheduler = Field("linear", title="LR scheduler")
    """Learning-rate schedule after the warm-up."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, title="Weight decay")
    """The optimizer's weight decay."""
    max_grad_norm: float = Field(1.0, gt=0.0, title="Max gradient norm")
    """Gradient clipping norm of each optimizer step."""
    seed: int = Field(42, ge=0, le=MAX_SEED, title="Seed")
    """Random seed for initialisation and data order (numpy takes seeds below 2**32)."""
    packing: bool = Field(True, title="Packing")
    """Pack examples into full rows without cross-example attention (padding-free, faster on short examples); off
    with DP-SGD, whose privacy unit is one example per row."""
    loss_on: LossOn = Field("completion", title="Loss on")
    """completion: learn only completions / assistant turns; all: every token."""
    gradient_checkpointing: bool = Field(False, title="Gradient checkpointing")
    """Recompute activations in the backward pass: less memory, slower steps; not with DP-SGD."""
    logging_steps: int = Field(1, ge=1, title="Log every")
    """Log the loss and learning rate every N optimizer steps."""
    save_steps: int = Field(50, ge=1, title="Checkpoint every")
    """Save a checkpoint every N optimizer steps (a retry resumes from the last one)."""
    save_total_limit: int = Field(2, ge=1, title="Checkpoints kept")
    """How many of the newest checkpoints are kept."""
    distributed: Distributed = Field("auto", title="Multi-GPU strategy")
    """How more than one process trains: ddp replicates the model on each device, fsdp shards parameters, gradients
    and optimizer state (models that do not fit one device); auto is ddp."""
    num_processes: int | None = Field(None, ge=1, le=64, title="Training processes")
    """Training processes on the node; empty means one per GPU of the run (one on CPU). The effective batch is
    per_device_train_batch_size x gradient_accumulation_steps x processes."""


class PrivacySpec(_Section):
    dp_enabled: bool = Field(False, title="Differential privacy")
    """Train with DP-SGD (Opacus); epsilon is reported in the metrics."""
    dp_target_epsilon: float = Field(8.0, gt=0.0, le=1000.0, title="Target epsilon")
    """Privacy budget to reach at the end of training (lower is more private)."""
    dp_delta: float | None = Field(None, gt=0.0, lt=1.0, title="Delta")
    """DP failure probability; empty means 1 / n^1.1 for n training examples, and it must be below 1 / n."""
    dp_max_grad_norm: float = Field(1.0, gt=0.0, title="Per-sample clip norm")
    """DP-SGD clips each example's gradient to this norm."""
    dp_reproducible: bool = Field(False, title="Reproducible DP batches")
    """Draw the DP batches and noise from seed, so the run can be repeated exactly; seed is public (job.json,
    MLflow), so the batches are too. Off draws them from the OS's secure random source."""
    dp_log_train_metrics: bool = Field(False, title="Log private train loss")
    """Log and save a DP run's training loss, gradient norm and token counts; they are computed from the private
    batches without noise, so they are outside the DP guarantee."""

    def delta_for(self, n: int) -> float:
        """dp_delta, or the default 1 / n^1.1 for n training examples."""
        return self.dp_delta or 1.0 / (n**1.1)

    def check_dataset(self, n: int, logical_batch: int) -> None:
        """Refuse a delta or batch the DP accountant's assumptions do not hold for, given n
        training examples (torch-free, so it runs before any model loads)."""
        if n < 2:
            raise JobSpecError(
                f"DP-SGD needs at least 2 training examples, the data has {n}; add data or turn dp_enabled off"
            )
        if logical_batch >= n:
            raise JobSpecError(
                "the DP batch (per_device_train_batch_size x gradient_accumulation_steps = "
                f"{logical_batch}) must be smaller than the {n} training examples: each example joins a step "
                "with probability batch / n, which must be below 1 for subsampling to protect anyone; lower "
                "the batch or add data"
            )
        if self.dp_delta is not None and self.dp_delta >= 1.0 / n:
            raise JobSpecError(
                f"dp_delta {self.dp_delta:g} is not below 1/n = {1.0 / n:.3g} for the n = {n} training examples: "
                "a delta that large allows publishing an example outright; leave dp_delta empty for the "
                f"default 1/n^1.1 = {1.0 / n**1.1:.3g}, or set one below 1/n"
            )


class EvalSpec(_Section):
    eval_steps: int | None = Field(None, ge=1, title="Eval every")
    """Compute eval loss every N steps; empty evaluates at the end only."""
    per_device_eval_batch_size: int = Field(8, ge=1, title="Eval batch size")
    """Examples per device per eval step."""
    num_sample_generations: int = Field(4, ge=0, le=100, title="Sample generations")
    """Prompts to generate from before and after training (samples.jsonl)."""
    sample_max_new_tokens: int = Field(32, ge=1, le=4096, title="Sample length")
    """New tokens per sample generation."""


class JobSpec(BaseModel):
    """One training job."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    spec_version: int = SPEC_VERSION
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec()
    evaluation: EvalSpec = EvalSpec()
    output_dir: str = Field("output", title="Output directory")
    """Where outputs go, relative to job.json or absolute."""
    data_fingerprint: str | None = Field(None, title="Data fingerprint")
    """Content hash of the data and spec, set by the pipeline."""
    labels: dict[str, str] = Field(default_factory=dict, title="Labels")
    """Free-form lineage (dag_id, run_id, ...)."""

    @field_validator("spec_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SPEC_VERSION:
            raise ValueError(
                f"this trainer reads spec_version {SPEC_VERSION}, not {v}; regenerate job.json with a matching loraflow"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _dp_trains_one_example_per_row(cls, data: Any) -> Any:
        """DP-SGD clips each row's gradient: with packing a row would hold several examples and
        the guarantee would cover rows, not examples. So DP turns packing off (job.json shows it)."""
        if not isinstance(data, dict):
            return data
        privacy = data.get("privacy") or {}
        dp = privacy.get("dp_enabled") if isinstance(privacy, dict) else getattr(privacy, "dp_enabled", False)
        training = data.get("training") or {}
        if dp and isinstance(training, dict):
            return {**data, "training": {**training, "packing": False}}
        if dp and getattr(training, "packing", False):
            return {**data, "training": training.model_copy(update={"packing": False})}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.privacy.dp_enabled and self.model.quantization != "none":
            raise ValueError(
                "privacy.dp_enabled needs model.quantization='none': Opacus cannot compute per-sample grads "
                "through k-bit layers"
            )
        if self.privacy.dp_enabled and self.training.gradient_checkpointing:
            raise ValueError(
                "privacy.dp_enabled cannot be combined with training.gradient_checkpointing: checkpointed layers "
                "give Opacus no per-sample gradients; turn gradient_checkpointing off"
            )
        if self.privacy.dp_enabled and (self.training.num_processes or 1) > 1:
            raise ValueError(
                "privacy.dp_enabled trains on one process: set training.num_processes to 1 (or leave it empty "
                "and give the run one GPU)"
            )
        return self

    @property
    def completion_only(self) -> bool:
        """Loss on completions/assistant turns only; plain text has no completion, so it trains on all."""
        return self.training.loss_on == "completion" and self.data.data_format != "text"

    # -- paths -----------------------------------------------------------------

    def resolve(self, path: str | None, base_dir: Path) -> Path | None:
        if path is None:
            return None
        p = Path(path)
        return p if p.is_absolute() else (base_dir / p)

    def is_local_model(self, base_dir: Path) -> bool:
        p = Path(self.model.base_model)
        return p.is_absolute() or p.parts[0] in (".", "..") or (base_dir / p).exists()

    # -- identity --------------------------------------------------------------

    def spec_hash(self) -> str:
        """Hash of everything that changes the trained weights (not where outputs go, not labels)."""
        payload = self.model_dump(mode="json", exclude={"output_dir", "labels", "data_fingerprint"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def flat_params(self) -> dict[str, Any]:
        """Every setting under its own name: the names of Params, MLflow params and docs."""
        flat: dict[str, Any] = {"spec_version": self.spec_version}
        for section in ("model", "data", "lora", "training", "privacy", "evaluation"):
            flat.update(getattr(self, section).model_dump(mode="json"))
        return flat

    # -- io --------------------------------------------------------------------

    def write(self, path: Path) -> None:
        contract.atomic_write(path, self.model_dump_json(indent=2))


SECTION_OF: dict[str, str] = {
    name: section
    for section, model in (
        ("model", ModelSpec),
        ("data", DataSpec),
        ("lora", LoraSpec),
        ("training", TrainingSpec),
        ("privacy", PrivacySpec),
        ("evaluation", EvalSpec),
    )
    for name in model.model_fields
}


def from_flat(flat: dict[str, Any], **top: Any) -> JobSpec:
    """Build a spec from flat field names (a trigger form's params). Unknown names are an error."""
    sections: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in flat.items():
        section = SECTION_OF.get(key)
        if section is None:
            unknown.append(key)
        else:
            sections.setdefault(section, {})[key] = value
    if unknown:
        raise JobSpecError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; the known names are listed in the job spec docs"
        )
    return validate({**sections, **top})


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(spec)"
        lines.append(
            f"{where}: {err['msg']} (got {err.get('input')!r})"
            if err["type"] != "missing"
            else f"{where}: required field is missing"
        )
    return "; ".join(lines)


def validate(data: dict[str, Any]) -> JobSpec:
    """Validate a dict into a JobSpec, or raise JobSpecError naming every wrong field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError(f"invalid job spec: {_format_errors(exc)}") from None


def load(path: str | Path) -> JobSpec:
    """Read and validate job.json."""
    path = Path(path)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise JobSpecError(f"job spec {path} does not exist; pass --job with the path of job.json") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise JobSpecError(
            f"job spec {path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise JobSpecError(f"job spec {path} must be a JSON object, not {type(data).__name__}")
    return validate(data)


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
