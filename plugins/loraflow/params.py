"""The trigger form: one Airflow ``Param`` per setting a user changes, grouped in sections.

Names are the job spec's field names (plus a few pipeline settings), and types, ranges and
enums come from the job spec's JSON schema, so the form and the trainer cannot drift: the
UI rejects a bad value before anything runs, and ``workspace.prepare`` validates again.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from airflow.sdk import Param
from loraflow_trainer import spec

from loraflow import config

# name -> (section, title, description); defaults come from the job spec unless given.
# The allowed range of a number is added to its description from the job spec's schema.
_SPEC_PARAMS: dict[str, tuple[str, str, str]] = {
    "base_model": ("Model", "Base model", "A model directory under the model cache (LORAFLOW_MODELS), e.g. tiny-llama, or a hub id such as org/name."),
    "quantization": ("Model", "Quantization", "none trains LoRA on full-precision weights; 4bit is QLoRA (NF4); 8bit is LLM.int8."),
    "rope_scaling_factor": ("Model", "RoPE scaling factor", "Linear RoPE scaling to extend the context; empty keeps the model's own."),
    "data_format": ("Data", "Data format", "text (a text column), prompt_completion (prompt + completion) or chat (a messages column)."),
    "lora_r": ("LoRA", "LoRA rank (r)", "Rank of the low-rank update; 8-64 is typical."),
    "lora_alpha": ("LoRA", "LoRA alpha", "Scaling numerator; the update is scaled by alpha / r."),
    "lora_dropout": ("LoRA", "LoRA dropout", "Dropout on the LoRA input during training."),
    "use_rslora": ("LoRA", "rsLoRA", "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."),
    "num_train_epochs": ("Training", "Epochs", "Passes over the training data (ignored when max steps is set)."),
    "max_steps": ("Training", "Max steps", "Stop after this many optimizer steps; -1 trains for the epochs."),
    "learning_rate": ("Training", "Learning rate", "Peak learning rate of the scheduler."),
    "per_device_train_batch_size": ("Training", "Batch size", "Examples per device per step."),
    "gradient_accumulation_steps": ("Training", "Gradient accumulation", "Steps to accumulate before an optimizer step."),
    "max_seq_length": ("Training", "Max sequence length", "Tokens per example; the data check fails rows longer than this."),
    "warmup_steps": ("Training", "Warm-up steps", "Linear warm-up steps."),
    "lr_scheduler_type": ("Training", "LR scheduler", "Learning-rate schedule after the warm-up."),
    "packing": ("Training", "Packing", "Pack examples into one row without cross-example attention (faster on short examples)."),
    "loss_on": ("Training", "Loss on", "completion: learn only completions / assistant turns; all: every token."),
    "seed": ("Training", "Seed", "Random seed for initialisation and data order."),
    "save_steps": ("Training", "Checkpoint every", "Save a checkpoint every N optimizer steps (a retry resumes from the last one)."),
    "dp_enabled": ("Privacy", "Differential privacy", "Train with DP-SGD (Opacus); epsilon is reported in the metrics."),
    "dp_target_epsilon": ("Privacy", "Target epsilon", "Privacy budget to reach at the end of training (lower is more private)."),
    "dp_max_grad_norm": ("Privacy", "Per-sample clip norm", "DP-SGD clips each example's gradient to this norm."),
    "dp_delta": ("Privacy", "Delta", "DP failure probability; empty means 1 / n^1.1 for n training examples, and it must be below 1 / n."),
    "dp_reproducible": ("Privacy", "Reproducible DP batches", "Draw the DP batches and noise from the seed (public, so the batches are too); off uses the OS's secure random source."),
    "dp_log_train_metrics": ("Privacy", "Log private train loss", "Log a DP run's training loss and gradient norm; they are computed on private batches without noise, outside the guarantee."),
    "distributed": ("Runtime", "Multi-GPU strategy", "With more than one GPU: ddp replicates the model on each, fsdp shards it (models that do not fit one GPU); auto is ddp."),
    "num_processes": ("Runtime", "Training processes", "Processes on the worker; empty means one per leased GPU (one on CPU). The effective batch is batch size x accumulation x processes."),
    "eval_steps": ("Evaluation", "Eval every", "Compute eval loss every N steps; empty evaluates at the end only."),
    "num_sample_generations": ("Evaluation", "Sample generations", "Prompts to generate from before and after training (samples.jsonl)."),
}

# The order a person fills the form in; Airflow shows sections in the order of their first param.
SECTIONS = ("Data", "Model", "LoRA", "Training", "Privacy", "Evaluation", "Registry", "Runtime")

# What a dropdown shows for each value (Airflow's ``values_display``; "null" is the empty choice).
_LABELS: dict[str, dict[str, str]] = {
    "quantization": {"none": "none (LoRA on full-precision weights)", "4bit": "4bit (QLoRA, NF4)", "8bit": "8bit (LLM.int8)"},
    "data_format": {"text": "text (a text column)", "prompt_completion": "prompt_completion (prompt + completion columns)",
                    "chat": "chat (a messages column)"},
    "loss_on": {"completion": "completion (only completions / assistant turns)", "all": "all (every token)"},
    "promotion_metric": {"eval_loss": "eval_loss (held-out loss)", "perplexity": "perplexity (held-out)",
                         "train_loss": "train_loss (mean over training)", "final_train_loss": "final_train_loss (last logged step)"},
}

GPUS_PATTERN = r"^(auto|all|none|\d{1,3}(,\d{1,3}){0,63})$"
MEMORY_PATTERN = r"^(|[1-9]\d{0,5}[kmg])$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Pipeline settings that are not part of the job spec.
_PIPELINE_PARAMS: dict[str, dict[str, Any]] = {
    "dataset_path": {
        "default": "examples/data/sample_chat.jsonl", "type": "string", "minLength": 1, "maxLength": 4096,
        "section": "Data", "title": "Dataset path",
        "description": "A CSV, JSONL or Parquet file under an allowed data root (LORAFLOW_DATA_ROOTS); relative paths resolve against the repository.",
    },
    "eval_dataset_path": {
        "default": None, "type": ["null", "string"], "maxLength": 4096,
        "section": "Data", "title": "Eval dataset path",
        "description": "Optional held-out eval file (same format) under an allowed data root; when set, eval fraction is ignored and the data check fails rows that also appear in the training data.",
    },
    "eval_fraction": {
        "default": 0.1, "type": "number", "minimum": 0.0, "maximum": 0.5,
        "section": "Data", "title": "Eval fraction",
        "description": "Share of rows held out for eval loss, chosen by content hash (stable across runs).",
    },
    "min_rows": {
        "default": 20, "type": "integer", "minimum": 1, "maximum": 100_000_000,
        "section": "Data", "title": "Minimum rows", "description": "Fewer usable rows than this fails the data check.",
    },
    "registered_model_name": {
        "default": "loraflow-model", "type": "string", "pattern": MODEL_NAME_PATTERN,
        "section": "Registry", "title": "Registered model name", "description": "MLflow registered model to add a version to.",
    },
    "promotion_metric": {
        "default": "eval_loss", "type": "string", "enum": ["eval_loss", "perplexity", "train_loss", "final_train_loss"],
        "section": "Registry", "title": "Promotion metric",
        "description": "Used only when the evaluate task left no paired scores: the new version becomes champion only if it beats the champion's recorded value of this metric.",
    },
    "gate_margin": {
        "default": 0.0, "type": "number", "minimum": 0.0, "maximum": 100.0,
        "section": "Registry", "title": "Gate margin",
        "description": "Champion moves only if the paired bootstrap 95% interval of the per-example eval loss improvement over the champion, on this run's eval set, lies wholly above this many nats (the evaluate task scores both).",
    },
    "allow_behaviour_regressions": {
        "default": False, "type": "boolean",
        "section": "Registry", "title": "Allow behaviour regressions",
        "description": "Promote even if the new version fails a behaviour case the champion passes.",
    },
    "behaviour_suite_path": {
        "default": None, "type": ["null", "string"], "maxLength": 4096,
        "section": "Evaluation", "title": "Behaviour suite",
        "description": "Optional JSONL under an allowed data root: one case per line, a prompt with checks (must_contain, must_not_contain, regex, json_schema, max_length); each case is run on the new version and the champion.",
    },
    "evaluate_base": {
        "default": False, "type": "boolean",
        "section": "Evaluation", "title": "Also score the base model",
        "description": "The evaluate task also scores the base model with no adapter (reported, not gated).",
    },
    "max_epsilon": {
        "default": None, "type": ["null", "number"], "exclusiveMinimum": 0.0, "maximum": 1000.0,
        "section": "Privacy", "title": "Max epsilon (policy)",
        "description": "Privacy policy for DP runs: a version whose reported epsilon exceeds this is never champion. Empty: no policy.",
    },
    "runtime": {
        "default": None, "type": ["null", "string"], "enum": [None, "local", "docker"],
        "section": "Runtime", "title": "Runtime",
        "description": "docker runs the trainer image (DockerOperator); local runs the same CLI as a subprocess on the worker. "
                       "The default follows the deployment's LORAFLOW_RUNTIME.",
    },
    "gpus": {
        "default": "auto", "type": "string", "pattern": GPUS_PATTERN,
        "section": "Runtime", "title": "GPUs",
        "description": "auto takes one free GPU of the worker (CPU where it has none); all, none (CPU), or device ids such as 0,1. A run waits while another holds its GPUs.",
    },
    "memory_limit": {
        "default": None, "type": ["null", "string"], "pattern": MEMORY_PATTERN,
        "section": "Runtime", "title": "Container memory limit",
        "description": "A size with a k, m or g suffix, e.g. 32g; empty means no limit (docker runtime).",
    },
    "shm_size": {
        "default": "1g", "type": ["null", "string"], "pattern": MEMORY_PATTERN,
        "section": "Runtime", "title": "Container shared memory (/dev/shm)",
        "description": "e.g. 2g; dataloader workers and NCCL use it. Empty keeps Docker's 64m (docker runtime).",
    },
}

PIPELINE_PARAM_NAMES = frozenset(_PIPELINE_PARAMS)

# Where the form's defaults differ from the job spec's: they match the bundled sample
# dataset and the tiny model, so a scheduled run with defaults works out of the box.
FORM_DEFAULTS: dict[str, Any] = {"base_model": "tiny-llama", "data_format": "chat", "max_seq_length": 256}


@cache
def _field_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of each job spec field by name, with pydantic's $refs and anyOf flattened."""
    schema = spec.json_schema()
    out: dict[str, dict[str, Any]] = {}
    for section in schema.get("$defs", {}).values():
        for name, prop in section.get("properties", {}).items():
            out[name] = _flatten(prop)
    return out


def _flatten(prop: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in prop.items() if k in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "minLength", "const")}
    if "anyOf" in prop:
        types, merged = [], {}
        for alt in prop["anyOf"]:
            alt = _flatten(alt)
            t = alt.pop("type", None)
            if "const" in alt:
                merged.setdefault("enum", []).append(alt.pop("const"))
            if t:
                types.extend(t if isinstance(t, list) else [t])
            merged.update({k: v for k, v in alt.items() if k != "enum"})
        keep.update(merged)
        keep["type"] = sorted(set(types)) if len(set(types)) > 1 else (types[0] if types else "string")
    if "const" in keep:
        keep["enum"] = [keep.pop("const")]
    return keep


def _default(name: str) -> Any:
    section = spec.SECTION_OF[name]
    model = {"model": spec.ModelSpec, "data": spec.DataSpec, "lora": spec.LoraSpec, "training": spec.TrainingSpec,
             "privacy": spec.PrivacySpec, "evaluation": spec.EvalSpec}[section]
    field = model.model_fields[name]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def build_params(defaults: dict[str, Any] | None = None) -> dict[str, Param]:
    """The DAG's params, section by section. ``defaults`` overrides default values (e.g. the demo's base model)."""
    defaults = {**FORM_DEFAULTS, **(defaults or {})}
    schemas: dict[str, dict[str, Any]] = {}
    for name, schema in _PIPELINE_PARAMS.items():
        schemas[name] = dict(schema)
    for name, (section, title, description) in _SPEC_PARAMS.items():
        schema = dict(_field_schemas()[name])
        if name == "base_model":
            schema = {"type": "string", "minLength": 1, "maxLength": 4096}
        schemas[name] = {"default": _default(name), "title": title, "description": description, "section": section, **schema}
    params: dict[str, Param] = {}
    for name in sorted(schemas, key=lambda n: SECTIONS.index(schemas[n]["section"])):  # stable: keeps the order within a section
        schema = schemas[name]
        default = defaults.get(name, schema.pop("default"))
        params[name] = Param(default, **_form_schema(name, schema))
    return params


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _form_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A param's schema as the form should see it: ranges stated, dropdown labels, bounds it refuses.

    Airflow's number input clamps a typed value to ``minimum``/``maximum`` on blur, so 5000
    would silently become 1024. The bounds go under ``allOf`` instead: the form leaves the
    value as typed and Airflow refuses the trigger, naming the param and the range.
    """
    schema = dict(schema)
    bounds = {k: schema.pop(k) for k in _BOUNDS if k in schema}
    if bounds:
        schema["allOf"] = [bounds]
        schema["description"] = f"{schema['description'].rstrip('.')}. Allowed: {_range_text(bounds)}."
    labels = dict(_LABELS.get(name, {}))
    if name == "runtime":
        labels = {"null": f"deployment default ({config.default_runtime()})", "local": "local (subprocess on the worker)",
                  "docker": "docker (trainer image)"}
    if labels and "enum" in schema:
        schema["values_display"] = labels
    return schema


def _range_text(bounds: dict[str, Any]) -> str:
    def num(v: float) -> str:
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1000 else (str(int(v)) if float(v).is_integer() else f"{v:g}")

    lo = (f"at least {num(bounds['minimum'])}" if "minimum" in bounds else
          f"more than {num(bounds['exclusiveMinimum'])}" if "exclusiveMinimum" in bounds else None)
    hi = (f"at most {num(bounds['maximum'])}" if "maximum" in bounds else
          f"less than {num(bounds['exclusiveMaximum'])}" if "exclusiveMaximum" in bounds else None)
    if "minimum" in bounds and "maximum" in bounds:
        return f"{num(bounds['minimum'])} to {num(bounds['maximum'])}"
    return ", ".join(x for x in (lo, hi) if x)


def form_names() -> frozenset[str]:
    """The names a trigger conf may set: exactly the form's params (``build_params``' keys)."""
    return PIPELINE_PARAM_NAMES | frozenset(_SPEC_PARAMS)


# Why a known name is still not a trigger setting (the rest of the job spec is the pipeline's).
_NOT_A_SETTING = {
    "trust_remote_code": "a deployment setting (LORAFLOW_TRUST_REMOTE_CODE on the workers), never a trigger param",
    "train_path": "written by the pipeline; set dataset_path", "eval_path": "written by the pipeline; set eval_dataset_path",
}


def refuse_unknown(names) -> None:
    """Raise ParamsError naming every name that is not a form param (one message for all of them)."""
    from loraflow.errors import ParamsError

    bad = sorted({str(n) for n in names} - form_names())
    if not bad:
        return
    shown = [repr(n if len(n) <= 60 else n[:57] + "...") for n in bad[:25]]
    more = f" and {len(bad) - 25} more" if len(bad) > 25 else ""
    why = "; ".join(f"{n} is {_NOT_A_SETTING[n]}" for n in bad if n in _NOT_A_SETTING)
    raise ParamsError(
        f"the trigger conf sets {len(bad)} name(s) that are not trigger params: {', '.join(shown)}{more}"
        f"{' (' + why + ')' if why else ''}; a conf may set only the trigger form's params, listed in the form "
        "and in the README's params table"
    )


def refuse_invalid(conf: dict[str, Any]) -> None:
    """Raise ParamsError naming every value outside its param's schema (type, range, enum, pattern).

    The form and the REST trigger validate too; this is for a conf that skipped them
    (``airflow dags test``, a run inserted into the DB), so the same rules hold everywhere.
    """
    import jsonschema

    from loraflow.errors import ParamsError

    form = build_params()
    bad = []
    for name, value in conf.items():
        if name not in form:
            continue
        try:
            jsonschema.validate(value, form[name].schema)
        except jsonschema.ValidationError as exc:
            bad.append(f"{name}={_short(value)} ({exc.message[:120]})")
    if bad:
        raise ParamsError(f"invalid trigger param(s): {'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
                          "the trigger form shows each param's type and allowed values")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split(conf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trigger conf -> (pipeline settings, job spec fields). A name that is not a form param is an error."""
    refuse_unknown(conf)
    pipeline = {k: v for k, v in conf.items() if k in PIPELINE_PARAM_NAMES}
    job = {k: v for k, v in conf.items() if k not in PIPELINE_PARAM_NAMES}
    return pipeline, job
