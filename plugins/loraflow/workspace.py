"""The run workspace and the prepare step: trigger params -> validated job.json.

``<LORAFLOW_HOME>/runs/<dag_id>/<run_id>-<hash>/`` holds everything one DAG run reads and
writes: a readable prefix of the ids plus a hash of the full dag and run ids, so two runs
never share a folder, and ``owner.json`` records the run it belongs to. Prepare is the setup
of the teardown, so it stays small and safe: validate, confine paths, claim the directory,
write ``job.json`` and ``pipeline.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraflow import config, evaluation, runtimes
from loraflow.errors import ParamsError
from loraflow.params import GPUS_PATTERN, MEMORY_PATTERN, MODEL_NAME_PATTERN, refuse_invalid, refuse_unknown, split
from loraflow_trainer import spec
from loraflow_trainer.contract import (
    EVAL_FILE,
    JOB_FILE,
    OUTPUT_DIR,
    TRAIN_FILE,
    atomic_write_json,
    is_model_dir,
    missing_model_message,
)
from loraflow_trainer.errors import JobSpecError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
DATASET_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


OWNER = "owner.json"
PIPELINE_FILE = "pipeline.json"  # the Airflow side's settings of the run (``Pipeline``); the trainer never reads it


def safe_name(run_id: str) -> str:
    """A run id as one path component (run ids hold ':' and '+'); folds characters, so not unique."""
    name = _UNSAFE.sub("_", run_id).strip("._") or "run"
    return name[:100]


def run_dir(dag_id: str, run_id: str) -> Path:
    """The workspace of one DAG run: readable, and unique per (dag_id, run_id) whatever they hold.

    ``safe_name`` folds ``a:b`` and ``a_b`` together and cuts long ids, so the folder name
    carries a hash of the full ids as well.
    """
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return config.runs_dir() / safe_name(dag_id) / f"{safe_name(run_id)}-{digest}"


def claim(ws: Path, dag_id: str, run_id: str) -> None:
    """Create ``ws`` and mark it as this run's; refuse one that belongs to another run.

    The owner file is created exclusively, so of two runs racing for one folder exactly one
    wins; a retry of prepare for the same run finds its own mark and goes on.
    """
    ws.mkdir(parents=True, exist_ok=True)
    mine = {"dag_id": dag_id, "run_id": run_id}
    marker = ws / OWNER
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            owner = None
        if owner != mine:
            raise ParamsError(
                f"workspace {ws} belongs to another DAG run ({owner!r}), not {dag_id}/{run_id}; nothing was written "
                f"there: remove the folder if that run is gone, or trigger with another run id"
            ) from None
        return
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)


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
    # the evaluate task and the promotion gate (loraflow.evaluation, loraflow.gate)
    behaviour_suite_path: str | None = None
    gate_margin: float = 0.0
    max_epsilon: float | None = None
    allow_behaviour_regressions: bool = False
    evaluate_base: bool = False
    trial: int | None = None  # the trial of a sweep this workspace holds (loraflow.sweep); None: a whole run

    @property
    def run_key(self) -> str:
        """The idempotency key of this run's MLflow run and version: one per DAG run, one per trial of a sweep."""
        key = f"{self.dag_id}/{self.run_id}"
        return key if self.trial is None else f"{key}/{trial_name(self.trial)}"

    @classmethod
    def load(cls, workspace: str | Path) -> Pipeline:
        return cls(**json.loads((Path(workspace) / PIPELINE_FILE).read_text()))


def confine(path_value: str, roots: list[Path], what: str) -> Path:
    """Resolve a user-given path and require it inside one of ``roots`` (symlinks resolved)."""
    if "\x00" in path_value or "://" in path_value or path_value.startswith("file:"):
        raise ParamsError(
            f"{what} {path_value!r} must be a plain file path, not a URL; "
            f"give a path under {', '.join(map(str, roots))}"
        )
    raw = Path(path_value).expanduser()
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots] + [config.repo_root() / raw]
    for candidate in candidates:
        try:
            candidate.resolve()
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            raise ParamsError(
                f"{what} {path_value!r} is a symlink loop ({candidate}); point it at a real file"
            ) from None
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved == root or root in resolved.parents for root in roots):
            if resolved.exists():
                return resolved
    inside = [c.resolve() for c in candidates if any(c.resolve() == r or r in c.resolve().parents for r in roots)]
    if inside:
        fix = (
            "put the model directory there (config.json, weights and tokenizer, as save_pretrained writes them), "
            "or name a hub id such as org/name"
            if what == "base_model"
            else "upload the file there or fix the path"
        )
        raise ParamsError(f"{what} {path_value!r} does not exist (looked at {inside[0]}); {fix}")
    raise ParamsError(
        f"{what} {path_value!r} resolves outside the allowed roots {', '.join(map(str, roots))}; "
        + (
            "move the model directory into the model cache (LORAFLOW_MODELS)"
            if what == "base_model"
            else "move the file under one of them or add its directory to LORAFLOW_DATA_ROOTS"
        )
    )


def resolve_base_model(value: str) -> str:
    """The base model as the Airflow host sees it: a model directory of the cache, or a hub id (org/name)."""
    models = config.models_dir()
    local = Path(value)
    if not local.is_absolute() and not (models / local).exists() and spec.HUB_ID_PATTERN.match(value) and "/" in value:
        return value
    resolved = confine(value, [models], "base_model")
    if not is_model_dir(resolved):
        raise ParamsError(missing_model_message(resolved))
    return str(resolved)


def prepare(conf: dict[str, Any], dag_id: str, run_id: str, run_type: str, raw_keys=None) -> Pipeline:
    """Validate the trigger conf into a job spec and write the run workspace.

    ``conf`` is the run's params (the form's defaults merged with the trigger conf);
    ``raw_keys`` the names the trigger conf itself set, checked too in case a deployment
    turned off Airflow's merging of the conf into the params.
    """
    pipeline, job = build(conf, dag_id, run_id, run_type, raw_keys)
    write(pipeline, job)
    return pipeline


def trial_name(trial: int) -> str:
    return f"trial-{trial}"


def write(pipeline: Pipeline, job: spec.JobSpec) -> None:
    """Claim the pipeline's workspace and write its job.json and pipeline.json."""
    ws = Path(pipeline.workspace)
    claim(ws, pipeline.dag_id, pipeline.run_id)
    job.write(ws / JOB_FILE)
    atomic_write_json(ws / PIPELINE_FILE, asdict(pipeline))


def build(
    conf: dict[str, Any], dag_id: str, run_id: str, run_type: str, raw_keys=None, trial: int | None = None
) -> tuple[Pipeline, spec.JobSpec]:
    """Every check of ``prepare``, without writing anything: the run's settings and its job spec.

    ``trial`` builds one trial of a sweep (``loraflow.sweep``): its workspace is
    ``<run workspace>/trial-<n>``, its run key ``<dag_id>/<run_id>/trial-<n>``.
    """
    refuse_unknown([*conf, *(raw_keys or ())])
    refuse_invalid(conf)
    settings, fields = split(conf)
    runtime = settings.get("runtime") or config.default_runtime()
    if runtime not in runtimes.NAMES:
        raise ParamsError(
            f"runtime {runtime!r} is not {' or '.join(runtimes.NAMES)}; set the runtime param or LORAFLOW_RUNTIME"
        )
    # The form validates these too; a trigger through the API or the CLI may skip the form.
    gpus = str(settings.get("gpus", "auto"))
    if not re.match(GPUS_PATTERN, gpus):
        raise ParamsError(f"gpus {gpus!r} is not auto, all, none or GPU ids such as 0,1")
    from loraflow import gpus as gpu_pool

    gpu_pool.check_params(gpus, bool(fields.get("dp_enabled")))  # N GPUs take N pool slots; DP takes one
    for name in ("memory_limit", "shm_size"):
        if not re.match(MEMORY_PATTERN, str(settings.get(name, "") or "")):
            raise ParamsError(f"{name} {settings[name]!r} is not a size such as 512m or 16g")
    name = str(settings.get("registered_model_name", "loraflow-model"))
    if not re.match(MODEL_NAME_PATTERN, name):
        raise ParamsError(f"registered_model_name {name!r} may hold only letters, digits, '.', '_' and '-'")
    dataset = dataset_file(str(settings.get("dataset_path", "")), "dataset_path")
    eval_dataset = None
    if settings.get("eval_dataset_path"):
        eval_dataset = dataset_file(str(settings["eval_dataset_path"]), "eval_dataset_path")
    base_host = resolve_base_model(str(fields.pop("base_model", "")))

    ws = run_dir(dag_id, run_id) if trial is None else run_dir(dag_id, run_id) / trial_name(trial)
    eval_fraction = float(settings.get("eval_fraction", 0.1))
    try:
        job = spec.from_flat(
            {
                **fields,
                "base_model": runtimes.model_path(runtime, base_host),
                "trust_remote_code": config.trust_remote_code(),
                "train_path": TRAIN_FILE,
                "eval_path": EVAL_FILE if eval_fraction > 0 or eval_dataset else None,
            },
            output_dir=OUTPUT_DIR,
            labels={"dag_id": dag_id, "run_id": run_id},
        )
    except JobSpecError as exc:
        raise ParamsError(str(exc)) from None
    pipeline = Pipeline(
        dag_id=dag_id,
        run_id=run_id,
        run_type=run_type,
        workspace=str(ws),
        dataset_path=str(dataset),
        eval_fraction=eval_fraction,
        min_rows=int(settings.get("min_rows", 20)),
        registered_model_name=name,
        promotion_metric=str(settings.get("promotion_metric", "eval_loss")),
        runtime=runtime,
        gpus=gpus,
        memory_limit=str(settings.get("memory_limit", "") or ""),
        shm_size=str(settings.get("shm_size", "1g") or ""),
        base_model_host=base_host,
        eval_dataset_path=str(eval_dataset) if eval_dataset else None,
        **evaluation.settings(settings),
        trial=trial,
    )
    return pipeline, job


def dataset_file(value: str, what: str) -> Path:
    """A dataset param as a regular CSV/JSONL/Parquet file inside the data roots.

    A named pipe would block the data check until its timeout, a directory or a device
    fails deep inside a reader: refuse them here. The suffix may be in any case (.JSONL).
    """
    path = confine(value, config.data_roots(), what)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ParamsError(
            f"{what} {value!r} cannot be read ({exc.strerror}); fix the path or the file's permissions"
        ) from None
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _NOT_REGULAR if is_kind(mode)), "not a regular file")
        raise ParamsError(
            f"{what} {value!r} ({path}) is {kind}, not a regular file; give the path of a CSV, JSONL or Parquet file"
        )
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise ParamsError(
            f"{what} {path.name!r} is not CSV, JSONL or Parquet (.csv, .jsonl, .parquet); convert it to one of those"
        )
    if not os.access(path, os.R_OK):
        raise ParamsError(f"{what} {value!r} ({path}) is not readable by the Airflow worker; fix its permissions")
    return path


def load_job(workspace: str | Path) -> spec.JobSpec:
    return spec.load(Path(workspace) / JOB_FILE)
