"""What the Airflow side and the trainer agree on, in one torch-free module both import.

A run's workspace is one directory::

    job.json                      the validated job spec (``spec.JobSpec``)
    data/train.parquet            preprocessed training rows, in the format's columns
    data/eval.parquet             held-out rows (when the job has an eval split)
    data/dataset_schema.json      the data checks' schema of the dataset
    data_report.json              the data checks' verdict (written whatever the outcome)
    output/                       what the trainer writes; complete only once ``_SUCCESS`` exists
        adapter/  model/  metrics.json  metadata.json  samples.jsonl
        dp_accounting.json        (DP runs)  events.jsonl (progress)  checkpoints/

The dataset formats and their columns, the chat roles, the chat-message parser, the
atomic write and the "is this a saved HF model directory" check live here too, so that a
name changed on one side cannot drift from the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The workspace, relative to its root.
JOB_FILE = "job.json"
DATA_DIR = "data"
TRAIN_FILE = f"{DATA_DIR}/train.parquet"
EVAL_FILE = f"{DATA_DIR}/eval.parquet"
DATASET_SCHEMA_FILE = f"{DATA_DIR}/dataset_schema.json"
FINGERPRINT_FILE = "fingerprint.json"  # the data fingerprint, read by the skip and register tasks
DATA_REPORT_FILE = "data_report.json"  # the data checks' verdict, row by row
OUTPUT_DIR = "output"

# The trainer's output directory, relative to it.
SUCCESS = "_SUCCESS"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
METADATA_FILE = "metadata.json"
SAMPLES_FILE = "samples.jsonl"
ACCOUNTING_FILE = "dp_accounting.json"
EVENTS_FILE = "events.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EVAL_RESULT_FILE = "eval.json"  # the evaluate entry point's scores
EVAL_REQUEST_FILE = "evaluate_request.json"  # what evaluate scores (beside job.json), written by the Airflow side
# The small files registration logs next to the model (the adapter and model dirs go separately).
OUTPUT_FILES = (METRICS_FILE, METADATA_FILE, SAMPLES_FILE, ACCOUNTING_FILE)

# The dataset formats and their columns (the names preprocessing writes and the trainer reads).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
DATA_FORMATS = tuple(FORMAT_COLUMNS)
ROLES = frozenset({"system", "user", "assistant", "tool"})


class MessagesError(ValueError):
    """A chat cell that is not a non-empty list of ``{role, content}`` string objects."""


def parse_messages(value: Any) -> list[dict[str, str]]:
    """A chat cell (JSON text, a list, or an array from Parquet) as ``[{role, content}, ...]``.

    Only ``role`` and ``content`` are kept. Raises ``MessagesError`` saying what is wrong;
    callers add the file and row.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MessagesError("messages is not valid JSON; store a list of {role, content} objects") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise MessagesError("messages must be a non-empty list of {role, content} objects")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MessagesError("messages must be a non-empty list of {role, content} objects with string values")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part.

    The temporary name carries the pid, so two writers never share a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write(path, json.dumps(payload, indent=2, default=str))


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` is a saved HF model directory (``save_pretrained`` writes ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def missing_model_message(path: Path) -> str:
    """The error text for a base model path that is not a saved model directory."""
    return (
        f"base model {path} has no config.json; point base_model at a directory written by save_pretrained "
        "(in the model cache, mounted under /models in the container) or at a hub id"
    )
