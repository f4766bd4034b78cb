"""The trigger form: one Airflow ``Param`` per setting a user changes, grouped in sections.

Every param is a field declared once, with its title, description, default and bounds: the
job spec's fields (``loraflow_trainer.spec``) and the pipeline settings below
(``PipelineSettings``). The form, the DAG's docs (``loraflow.docs``) and ``loraflow params``
read them from the fields' JSON schema, so the form and the trainer cannot drift: the UI
rejects a bad value before anything runs, and ``workspace.prepare`` validates again.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from airflow.sdk import Param
from pydantic import BaseModel, ConfigDict, Field

from loraflow import config
from loraflow.errors import ParamsError
from loraflow_trainer import spec

GPUS_PATTERN = r"^(auto|all|none|\d{1,3}(,\d{1,3}){0,63})$"
MEMORY_PATTERN = r"^(|[1-9]\d{0,5}[kmg])$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_PATH = 4096


class PipelineSettings(BaseModel):
    """The trigger params that are not job spec fields: which data, how a version is gated, where it trains."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)  # as the job spec's

    dataset_path: str = Field(
        "examples/data/sample_chat.jsonl", min_length=1, max_length=MAX_PATH, title="Dataset path"
    )
    """A CSV, JSONL or Parquet file under an allowed data root (LORAFLOW_DATA_ROOTS); relative paths resolve against
    the repository."""
    eval_dataset_path: str | None = Field(None, max_length=MAX_PATH, title="Eval dataset path")
    """Optional held-out eval file (same format) under an allowed data root; when set, eval fraction is ignored and
    the data check fails rows that also appear in the training data."""
    eval_fraction: float = Field(0.1, ge=0.0, le=0.5, title="Eval fraction")
    """Share of rows held out for eval loss, chosen by content hash (stable across runs)."""
    min_rows: int = Field(20, ge=1, le=100_000_000, title="Minimum rows")
    """Fewer usable rows than this fails the data check."""
    registered_model_name: str = Field("loraflow-model", pattern=MODEL_NAME_PATTERN, title="Registered model name")
    """MLflow registered model to add a version to."""
    promotion_metric: Literal["eval_loss", "perplexity", "train_loss", "final_train_loss"] = Field(
        "eval_loss", title="Promotion metric"
    )
    """Used only when the evaluate task left no paired scores: the new version becomes champion only if it beats the
    champion's recorded value of this metric."""
    gate_margin: float = Field(0.0, ge=0.0, le=100.0, title="Gate margin")
    """Champion moves only if the paired bootstrap 95% interval of the per-example eval loss improvement over the
    champion, on this run's eval set, lies wholly above this many nats (the evaluate task scores both)."""
    allow_behaviour_regressions: bool = Field(False, title="Allow behaviour regressions")
    """Promote even if the new version fails a behaviour case the champion passes."""
    behaviour_suite_path: str | None = Field(None, max_length=MAX_PATH, title="Behaviour suite")
    """Optional JSONL under an allowed data root: one case per line, a prompt with checks (must_contain,
    must_not_contain, regex, json_schema, max_length); each case is run on the new version and the champion."""
    evaluate_base: bool = Field(False, title="Also score the base model")
    """The evaluate task also scores the base model with no adapter (reported, not gated)."""
    max_epsilon: float | None = Field(None, gt=0.0, le=1000.0, title="Max epsilon (policy)")
    """Privacy policy for DP runs: a version whose reported epsilon exceeds this is never champion. Empty: no policy."""
    runtime: Literal["local", "docker"] | None = Field(None, title="Runtime")
    """docker runs the trainer image in a hardened container on the worker's Docker engine; local runs the same
    CLI as a subprocess on the worker. The default follows the deployment's LORAFLOW_RUNTIME."""
    gpus: str = Field("auto", pattern=GPUS_PATTERN, title="GPUs")
    """auto takes one free GPU of the worker (CPU where it has none); all, none (CPU), or device ids such as 0,1. A
    run waits while another holds its GPUs."""
    memory_limit: str | None = Field(None, pattern=MEMORY_PATTERN, title="Container memory limit")
    """A size with a k, m or g suffix, e.g. 32g; empty means no limit (docker runtime)."""
    shm_size: str | None = Field("1g", pattern=MEMORY_PATTERN, title="Container shared memory (/dev/shm)")
    """e.g. 2g; dataloader workers and NCCL use it. Empty keeps Docker's 64m (docker runtime)."""


PIPELINE_PARAM_NAMES = frozenset(PipelineSettings.model_fields)


class SweepSettings(BaseModel):
    """The params only the sweep DAG (``loraflow_sweep``) has: which trials, which of them to register."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sweep: dict[str, list[Any]] | list[dict[str, Any]] = Field(
        default_factory=lambda: {"lora_r": [4, 8]}, title="Sweep"
    )
    """The trials: a grid, an object of trainer settings to lists of values (every combination is a trial), or a
    list of override objects (one trial each); every other setting comes from this form. At most 16 trials."""
    sweep_register: Literal["best", "all"] = Field("best", title="Register")
    """best registers only the winning trial (the gate's choice, on the same eval set); all registers every trial
    that finished, the winner last."""


SWEEP_PARAM_NAMES = tuple(SweepSettings.model_fields)

# The form, section by section in the order a person fills it in (Airflow shows sections in
# the order of their first param): pipeline settings and the job spec fields a trigger may set.
FORM: dict[str, tuple[str, ...]] = {
    "Data": ("dataset_path", "eval_dataset_path", "eval_fraction", "min_rows", "data_format"),
    "Model": ("base_model", "quantization", "rope_scaling_factor"),
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "use_rslora"),
    "Training": (
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "warmup_steps",
        "lr_scheduler_type",
        "packing",
        "loss_on",
        "seed",
        "save_steps",
    ),
    "Privacy": (
        "max_epsilon",
        "dp_enabled",
        "dp_target_epsilon",
        "dp_max_grad_norm",
        "dp_delta",
        "dp_reproducible",
        "dp_log_train_metrics",
    ),
    "Evaluation": ("behaviour_suite_path", "evaluate_base", "eval_steps", "num_sample_generations"),
    "Registry": ("registered_model_name", "promotion_metric", "gate_margin", "allow_behaviour_regressions"),
    "Runtime": ("runtime", "gpus", "memory_limit", "shm_size", "distributed", "num_processes"),
}
SECTIONS = tuple(FORM)
# The sweep DAG's form: the same sections, the sweep's own first.
SWEEP_FORM: dict[str, tuple[str, ...]] = {"Sweep": SWEEP_PARAM_NAMES, **FORM}

# What a dropdown shows for each value (Airflow's ``values_display``; "null" is the empty choice).
_LABELS: dict[str, dict[str, str]] = {
    "quantization": {
        "none": "none (LoRA on full-precision weights)",
        "4bit": "4bit (QLoRA, NF4)",
        "8bit": "8bit (LLM.int8)",
    },
    "data_format": {
        "text": "text (a text column)",
        "prompt_completion": "prompt_completion (prompt + completion columns)",
        "chat": "chat (a messages column)",
    },
    "loss_on": {"completion": "completion (only completions / assistant turns)", "all": "all (every token)"},
    "sweep_register": {"best": "best (only the winning trial)", "all": "all (every finished trial, the winner last)"},
    "promotion_metric": {
        "eval_loss": "eval_loss (held-out loss)",
        "perplexity": "perplexity (held-out)",
        "train_loss": "train_loss (mean over training)",
        "final_train_loss": "final_train_loss (last logged step)",
    },
}

# Where the form's defaults differ from the job spec's: they match the bundled sample
# dataset and the tiny model, so a scheduled run with defaults works out of the box.
FORM_DEFAULTS: dict[str, Any] = {"base_model": "tiny-llama", "data_format": "chat", "max_seq_length": 256}


@cache
def _fields() -> dict[str, dict[str, Any]]:
    """The JSON schema of every setting by name: the job spec's section fields and the pipeline settings, each
    description (the field's docstring) on one line."""
    job = spec.json_schema()
    fields = {name: prop for section in job["$defs"].values() for name, prop in section.get("properties", {}).items()}
    fields.update(PipelineSettings.model_json_schema()["properties"])
    fields.update(SweepSettings.model_json_schema()["properties"])
    return {name: {**prop, "description": " ".join(prop["description"].split())} for name, prop in fields.items()}


# What a Param's schema keeps of a field's JSON schema (pydantic's titles, defaults and $refs are read apart).
_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern")


def _flatten(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema without pydantic's ``anyOf``: ``int | None`` becomes type ``["integer", "null"]``,
    a ``Literal`` an ``enum`` (``None`` first when the field may be empty)."""
    schema: dict[str, Any] = {}
    types: list[str] = []
    enum: list[Any] = []
    for alt in prop.get("anyOf", [prop]):
        kind = alt.get("type")
        types.extend(kind if isinstance(kind, list) else [kind] if kind else [])
        enum.extend([alt["const"]] if "const" in alt else alt.get("enum", []))
        schema.update({k: v for k, v in alt.items() if k in _KEYS and k != "type"})
    kinds = sorted(set(types))
    schema["type"] = kinds if len(kinds) > 1 else (kinds[0] if kinds else "string")
    if enum:
        schema["enum"] = [None, *enum] if "null" in kinds else enum
    return schema


def build_params(defaults: dict[str, Any] | None = None, form: dict[str, tuple[str, ...]] = FORM) -> dict[str, Param]:
    """The DAG's params, section by section. ``defaults`` overrides default values (e.g. the demo's base model);
    ``form`` is ``FORM`` (loraflow_finetune) or ``SWEEP_FORM`` (loraflow_sweep)."""
    defaults = {**FORM_DEFAULTS, **(defaults or {})}
    params: dict[str, Param] = {}
    for section, names in form.items():
        for name in names:
            field = _fields()[name]
            schema = {
                "title": field["title"],
                "description": field["description"],
                "section": section,
                **_flatten(field),
            }
            default = defaults[name] if name in defaults else field.get("default", _default_of(name))
            params[name] = Param(default, **_form_schema(name, schema))
    return params


def _default_of(name: str) -> Any:
    """A default pydantic leaves out of the JSON schema (a ``default_factory``'s)."""
    for model in (PipelineSettings, SweepSettings):
        if name in model.model_fields:
            return model.model_fields[name].get_default(call_default_factory=True)
    return None


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
        labels = {
            "null": f"deployment default ({config.default_runtime()})",
            "local": "local (subprocess on the worker)",
            "docker": "docker (trainer image)",
        }
    if labels and "enum" in schema:
        schema["values_display"] = labels
    return schema


def _range_text(bounds: dict[str, Any]) -> str:
    def num(v: float) -> str:
        return (
            f"{int(v):,}"
            if float(v).is_integer() and abs(v) >= 1000
            else (str(int(v)) if float(v).is_integer() else f"{v:g}")
        )

    lo = (
        f"at least {num(bounds['minimum'])}"
        if "minimum" in bounds
        else f"more than {num(bounds['exclusiveMinimum'])}"
        if "exclusiveMinimum" in bounds
        else None
    )
    hi = (
        f"at most {num(bounds['maximum'])}"
        if "maximum" in bounds
        else f"less than {num(bounds['exclusiveMaximum'])}"
        if "exclusiveMaximum" in bounds
        else None
    )
    if "minimum" in bounds and "maximum" in bounds:
        return f"{num(bounds['minimum'])} to {num(bounds['maximum'])}"
    return ", ".join(x for x in (lo, hi) if x)


def reference(form: dict[str, Param] | None = None) -> list[dict[str, Any]]:
    """Each param as the form shows it (section, name, title, default, description with its range), for the
    DAG's docs and ``loraflow params``."""
    form = build_params() if form is None else form
    return [
        {
            "section": p.schema["section"],
            "name": name,
            "title": p.schema["title"],
            "default": p.value,
            "description": p.description,
        }
        for name, p in form.items()
    ]


def form_names() -> frozenset[str]:
    """The names a trigger conf may set: exactly the form's params (``build_params``' keys)."""
    return frozenset(name for names in FORM.values() for name in names)


# Why a known name is still not a trigger setting (the rest of the job spec is the pipeline's).
_NOT_A_SETTING = {
    "trust_remote_code": "a deployment setting (LORAFLOW_TRUST_REMOTE_CODE on the workers), never a trigger param",
    "train_path": "written by the pipeline; set dataset_path",
    "eval_path": "written by the pipeline; set eval_dataset_path",
}


def refuse_unknown(names) -> None:
    """Raise ParamsError naming every name that is not a form param (one message for all of them)."""
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
        raise ParamsError(
            f"invalid trigger param(s): {'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
            "the trigger form shows each param's type and allowed values"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split(conf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trigger conf -> (pipeline settings, job spec fields). A name that is not a form param is an error."""
    refuse_unknown(conf)
    pipeline = {k: v for k, v in conf.items() if k in PIPELINE_PARAM_NAMES}
    job = {k: v for k, v in conf.items() if k not in PIPELINE_PARAM_NAMES}
    return pipeline, job
