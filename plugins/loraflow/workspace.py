"""The run workspace and the prepare step: trigger params -> validated job.json.

``<LORAFLOW_HOME>/runs/<dag_id>/<run_id>/`` holds everything one DAG run reads and writes.
Prepare is the setup of the teardown, so it stays small and safe: validate, confine paths,
create the directory, write ``job.json`` and ``pipeline.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraflow_trainer import spec
from loraflow_trainer.errors import JobSpecError

from loraflow import config
from loraflow.errors import ParamsError
from loraflow.params import GPUS_PATTERN, MEMORY_PATTERN, MODEL_NAME_PATTERN, split

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
DATASET_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def safe_name(run_id: str) -> str:
    """A run id as one path component (run ids hold ':' and '+')."""
    name = _UNSAFE.sub("_", run_id).strip("._") or "run"
    return name[:200]


def run_dir(dag_id: str, run_id: str) -> Path:
    return config.runs_dir() / safe_name(dag_id) / safe_name(run_id)


@dataclass(frozen=True)
class Pipeline:
    """Pipeline settings of one run (what is not in the job spec)."""

    dag_id: str
    run_id: str
    run_type: str
    workspace: str
    dataset_path: str
    eval_fraction: float
    min_rows: int
    registered_model_name: str
    promotion_metric: str
    runtime: str
    gpus: str
    memory_limit: str
    base_model_host: str  # the base model as the Airflow host sees it (checks read its tokenizer)
    eval_dataset_path: str | None = None
    shm_size: str = "1g"

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    @classmethod
    def load(cls, workspace: str | Path) -> Pipeline:
        return cls(**json.loads((Path(workspace) / "pipeline.json").read_text()))


def confine(path_value: str, roots: list[Path], what: str) -> Path:
    """Resolve a user-given path and require it inside one of ``roots`` (symlinks resolved)."""
    if "\x00" in path_value or "://" in path_value or path_value.startswith("file:"):
        raise ParamsError(f"{what} {path_value!r} must be a plain file path, not a URL; give a path under {', '.join(map(str, roots))}")
    raw = Path(path_value).expanduser()
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots] + [config.repo_root() / raw]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved == root or root in resolved.parents for root in roots):
            if resolved.exists():
                return resolved
    inside = [c.resolve() for c in candidates if any(c.resolve() == r or r in c.resolve().parents for r in roots)]
    if inside:
        raise ParamsError(f"{what} {path_value!r} does not exist (looked at {inside[0]}); upload the file there or fix the path")
    raise ParamsError(
        f"{what} {path_value!r} resolves outside the allowed roots {', '.join(map(str, roots))}; "
        "move the file under one of them or add its directory to LORAFLOW_DATA_ROOTS"
    )


def resolve_base_model(value: str) -> tuple[str, str]:
    """(path for the host, path for the trainer) of a model dir under the cache, or a hub id twice."""
    models = config.models_dir()
    local = Path(value)
    if not local.is_absolute() and not (models / local).exists() and spec.HUB_ID_PATTERN.match(value) and "/" in value:
        return value, value  # a hub id: org/name
    resolved = confine(value, [models], "base_model")
    if not (resolved / "config.json").exists():
        raise ParamsError(f"base_model {value!r} ({resolved}) has no config.json; save the model there with save_pretrained")
    return str(resolved), str(resolved)


def prepare(conf: dict[str, Any], dag_id: str, run_id: str, run_type: str) -> Pipeline:
    """Validate the trigger conf into a job spec and write the run workspace."""
    settings, fields = split(conf)
    runtime = settings.get("runtime") or config.default_runtime()
    if runtime not in ("local", "docker"):
        raise ParamsError(f"runtime {runtime!r} is not local or docker; set the runtime param or LORAFLOW_RUNTIME")
    # The form validates these too; a trigger through the API or the CLI may skip the form.
    gpus = str(settings.get("gpus", "auto"))
    if not re.match(GPUS_PATTERN, gpus):
        raise ParamsError(f"gpus {gpus!r} is not auto, all, none or GPU ids such as 0,1")
    for name in ("memory_limit", "shm_size"):
        if not re.match(MEMORY_PATTERN, str(settings.get(name, "") or "")):
            raise ParamsError(f"{name} {settings[name]!r} is not a size such as 512m or 16g")
    name = str(settings.get("registered_model_name", "loraflow-model"))
    if not re.match(MODEL_NAME_PATTERN, name):
        raise ParamsError(f"registered_model_name {name!r} may hold only letters, digits, '.', '_' and '-'")
    dataset = confine(str(settings.get("dataset_path", "")), config.data_roots(), "dataset_path")
    if dataset.suffix not in DATASET_SUFFIXES:
        raise ParamsError(f"dataset_path {dataset.name!r} is not CSV, JSONL or Parquet; convert it to one of those")
    eval_dataset = None
    if settings.get("eval_dataset_path"):
        eval_dataset = confine(str(settings["eval_dataset_path"]), config.data_roots(), "eval_dataset_path")
        if eval_dataset.suffix not in DATASET_SUFFIXES:
            raise ParamsError(f"eval_dataset_path {eval_dataset.name!r} is not CSV, JSONL or Parquet; convert it to one of those")
    base_host, base_trainer = resolve_base_model(str(fields.pop("base_model", "")))
    if runtime == "docker" and base_host == base_trainer and Path(base_host).is_absolute():
        base_trainer = f"{config.CONTAINER_MODELS}/{Path(base_host).relative_to(config.models_dir())}"

    ws = run_dir(dag_id, run_id)
    eval_fraction = float(settings.get("eval_fraction", 0.1))
    try:
        job = spec.from_flat(
            {**fields, "base_model": base_trainer, "train_path": "data/train.parquet",
             "eval_path": "data/eval.parquet" if eval_fraction > 0 or eval_dataset else None},
            output_dir="output",
            labels={"dag_id": dag_id, "run_id": run_id},
        )
    except JobSpecError as exc:
        raise ParamsError(str(exc)) from None
    ws.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(
        dag_id=dag_id, run_id=run_id, run_type=run_type, workspace=str(ws), dataset_path=str(dataset),
        eval_fraction=eval_fraction, min_rows=int(settings.get("min_rows", 20)),
        registered_model_name=name,
        promotion_metric=str(settings.get("promotion_metric", "eval_loss")), runtime=runtime,
        gpus=gpus, memory_limit=str(settings.get("memory_limit", "") or ""),
        shm_size=str(settings.get("shm_size", "1g") or ""),
        base_model_host=base_host, eval_dataset_path=str(eval_dataset) if eval_dataset else None,
    )
    job.write(ws / "job.json")
    _write_json(ws / "pipeline.json", asdict(pipeline))
    return pipeline


def load_job(workspace: str | Path) -> spec.JobSpec:
    return spec.load(Path(workspace) / "job.json")


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)

