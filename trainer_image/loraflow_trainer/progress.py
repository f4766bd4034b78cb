"""What a run reports while it works: a line a person reads, and the same event as JSON for tools.

``emit`` prints one readable line on stdout (the Airflow task log, ``docker logs``), such as
``step 120/1000 (12%)  loss 1.2345  lr 1.9e-4  1,850 tok/s  eta 7m40s``, and appends the
event as one JSON object to ``<output_dir>/events.jsonl``: the pipeline's register step
reads that file to log each metric's history to MLflow. The file is appended to, so a
retry that resumes from a checkpoint continues it; each attempt starts with an ``info``
event. Only rank 0 of a multi-process run writes the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from loraflow_trainer.contract import EVENTS_FILE

_events: Path | None = None

# Libraries that speak at INFO/WARNING about things a loraflow user cannot act on (an
# optional CPU kernel package, deprecations inside transformers/peft, MLflow's model-saving
# chatter). LORAFLOW_LIBRARY_LOG_LEVEL=INFO brings them back for debugging.
_LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "peft", "accelerate", "mlflow", "opacus", "torch.distributed")


def quiet_libraries() -> None:
    """Silence library noise; call before torch/transformers/mlflow are imported."""
    level = os.environ.get("LORAFLOW_LIBRARY_LOG_LEVEL", "ERROR").upper()
    known = level in ("DEBUG", "INFO", "WARNING", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower() if known else "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if level != "DEBUG":
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def open_events(output_dir: Path) -> Path:
    """Send the JSON events to ``output_dir/events.jsonl`` from now on."""
    global _events
    path = Path(output_dir) / EVENTS_FILE
    if _rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
    _events = path
    return path


def close_events() -> None:
    global _events
    _events = None


def read_events(output_dir: Path) -> list[dict[str, Any]]:
    """The events a run wrote (unreadable lines, e.g. one cut short by a kill, are skipped)."""
    path = Path(output_dir) / EVENTS_FILE
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def emit(event: str, **fields: Any) -> dict[str, Any]:
    """Report one event: a readable line on stdout, the JSON object in events.jsonl."""
    record = {"event": event, **fields}
    if _events is not None and _rank0():
        try:
            with _events.open("a") as f:
                f.write(json.dumps({**record, "time": round(time.time(), 3)}, default=str) + "\n")
        except OSError:
            pass  # a full disk must not hide the line below (the CLI reports the disk itself)
    print(line(record), flush=True)
    return record


# -- the readable line -------------------------------------------------------------------


def line(record: dict[str, Any]) -> str:
    r = dict(record)
    event = r.pop("event", "")
    fmt = _FORMATS.get(event)
    if fmt is not None:
        try:
            return fmt(r)
        except (KeyError, TypeError, ValueError):
            pass
    return f"{event}: " + "  ".join(f"{k} {_value(v)}" for k, v in r.items())


def _log_line(r: dict[str, Any]) -> str:
    step, total = int(r.get("step", 0)), int(r.get("max_steps", 0) or 0)
    where = f"step {step}/{total} ({100 * step // total}%)" if total > 0 else f"step {step}"
    if "eval_loss" in r:
        parts = [f"eval  {where}", f"eval_loss {r['eval_loss']:.4f}"]
        if "eval_perplexity" in r:
            parts.append(f"perplexity {_num(r['eval_perplexity'])}")
        if "eval_token_accuracy" in r:
            parts.append(f"token accuracy {r['eval_token_accuracy']:.3f}")
        return "  ".join(parts)
    if "train_runtime" in r and "loss" not in r:
        parts = [f"trained {step} steps in {duration(r['train_runtime'])}"]
        if "train_loss" in r:
            parts.append(f"mean loss {r['train_loss']:.4f}")
        return "  ".join(parts)
    parts = [where]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "learning_rate" in r:
        parts.append(f"lr {r['learning_rate']:.1e}".replace("e-0", "e-").replace("e+0", "e+"))
    if r.get("tokens_per_second") is not None:
        parts.append(f"{r['tokens_per_second']:,.0f} tok/s")
    if r.get("eta_seconds") is not None:
        parts.append(f"eta {duration(r['eta_seconds'])}")
    return "  ".join(parts)


def _info_line(r: dict[str, Any]) -> str:
    what = [
        f"on {r['device']}" if r.get("device") else "",
        f"base model {r['base_model']}" if r.get("base_model") else "",
        f"quantization {r['quantization']}" if r.get("quantization") not in (None, "none") else "",
        "with DP-SGD" if r.get("dp_enabled") else "",
    ]
    return (
        f"loraflow-train: {r.get('backend', 'trainer')} "
        + ", ".join(filter(None, what))
        + f"; outputs to {r.get('output_dir')}"
    )


def _data_line(r: dict[str, Any]) -> str:
    return (
        f"data: {r['train_examples']:,} training examples ({r['train_tokens']:,} tokens), "
        f"{r.get('eval_examples', 0):,} eval examples"
    )


def _metrics_line(r: dict[str, Any]) -> str:
    keys = (
        "eval_loss",
        "perplexity",
        "final_train_loss",
        "train_loss",
        "tokens_per_second",
        "train_runtime_s",
        "epsilon",
    )
    return "metrics: " + "  ".join(f"{k} {_num(r[k])}" for k in keys if k in r)


_FORMATS = {
    "log": _log_line,
    "info": _info_line,
    "data": _data_line,
    "metrics": _metrics_line,
    "saved": lambda r: f"saved the adapter and model to {r['output_dir']}",
    "resume": lambda r: f"resuming from checkpoint {r['checkpoint']}",
    "signal": lambda r: f"received {r['signal']}: saving a checkpoint and stopping",
    "failed": lambda r: f"failed (exit {r['exit_code']}): {r['error']}",
    "warning": lambda r: f"warning: {r['message']}",
    "tiny_model": lambda r: f"tiny model written to {r['path']}",
    "dp": lambda r: (
        f"DP-SGD: noise multiplier {_num(r['noise_multiplier'])}, sample rate {_num(r['sample_rate'])}, "
        f"delta {_num(r['delta'])}, {r['planned_steps']:,} steps planned, "
        f"clip norm {_num(r['max_grad_norm'])}, {r['randomness']} randomness"
        + ("" if r.get("train_metrics_logged") else "; private train loss not logged")
    ),
    "dp_new_sampler": lambda r: f"DP-SGD: fresh batch sampler from step {r['step']} ({r['reason']})",
    "dp_recalibrated": lambda r: (
        f"DP-SGD: epsilon {_num(r['spent_epsilon'])} already spent; noise multiplier "
        f"{_num(r['old_noise_multiplier'])} -> {_num(r['noise_multiplier'])} for the "
        f"{r['remaining_steps']:,} remaining steps"
    ),
}


def duration(seconds: float) -> str:
    """3s, 7m40s, 2h05m."""
    s = max(0, int(round(float(seconds))))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (math.isfinite(v) and float(v).is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _value(v: Any) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return _num(v)
    return json.dumps(v) if isinstance(v, list | dict) else str(v)
