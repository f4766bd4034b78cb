"""What the pipeline writes to MLflow: the run of a DAG run, its logs, the model version.

Idempotency is ours (the MLflow client retries POSTs, and a register task may be retried
after a crash): the MLflow run and the model version carry the tag ``loraflow.run_key``
(``<dag_id>/<run_id>``, no try number), and every step looks for its tagged result before
creating one. A server that cannot be reached raises ``RegistryUnavailable`` (retryable);
the outputs stay in the workspace for the retry. Before anything is registered, the
trainer's outputs are checked: complete, unaltered (``metadata.json``'s checksums) and
within their privacy budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow import cost
from loraflow.errors import RegistryError
from loraflow.registry import aliases
from loraflow.registry import tags as T
from loraflow.registry.client import mlflow_client, reachable, search_runs, search_versions
from loraflow_trainer import contract

# Per-step series from the trainer's events (output/events.jsonl) -> MLflow metric names. The
# names are those of HF's own MLflow integration; the windowed throughput has its own name
# because ``tokens_per_second`` is the run's overall figure in metrics.json.
HISTORY_METRICS = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_second": "step_tokens_per_second",
    "eval_loss": "eval_loss",
}


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    champion_version: str | None
    created: bool
    notes: tuple[str, ...] = ()  # why an alias was not moved to this version


# -- the trainer's outputs ---------------------------------------------------------------


def verify_outputs(output_dir: Path) -> dict[str, Any]:
    """Refuse outputs that are incomplete or altered since the trainer wrote them; return metadata.json."""
    if not (output_dir / contract.SUCCESS).exists():
        raise RegistryError(
            f"{output_dir} has no {contract.SUCCESS} marker: training did not finish; re-run the train task"
        )
    metadata = json.loads((output_dir / contract.METADATA_FILE).read_text())
    for rel, expected in metadata.get("checksums", {}).items():
        path = output_dir / rel
        if not path.exists():
            raise RegistryError(f"{path} listed in {contract.METADATA_FILE} is missing; re-run the train task")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise RegistryError(
                f"{path} does not match its checksum in {contract.METADATA_FILE} "
                "(corrupted or altered); re-run the train task"
            )
    check_privacy(output_dir)
    return metadata


def check_privacy(output_dir: Path) -> None:
    """Refuse a DP-SGD run whose recorded epsilon exceeds its target, or that has no accounting.

    The trainer never writes such outputs; this guards the registry against older trainers
    and hand-made output directories, so no version over its privacy target is registered.
    """
    metrics_path, accounting_path = output_dir / contract.METRICS_FILE, output_dir / contract.ACCOUNTING_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if "epsilon" not in metrics and not accounting_path.exists():
        return  # not a DP run
    if not accounting_path.exists():
        raise RegistryError(
            f"{output_dir} reports epsilon but has no {contract.ACCOUNTING_FILE}, so the privacy "
            "spent cannot be checked; re-run the train task with this loraflow version"
        )
    accounting = json.loads(accounting_path.read_text())
    target = float(accounting.get("target_epsilon", metrics.get("dp_target_epsilon", math.inf)))
    recorded = {contract.ACCOUNTING_FILE: accounting.get("epsilon"), contract.METRICS_FILE: metrics.get("epsilon")}
    for where, eps in recorded.items():
        if eps is None or not math.isfinite(float(eps)) or float(eps) > target * (1 + 1e-9):
            raise RegistryError(
                f"{output_dir}/{where} records epsilon {eps} over the target {target:g}: a version "
                "over its privacy target is never registered; retrain within the budget (lower "
                "max_steps or raise dp_target_epsilon)"
            )


def output_digest(metadata: dict[str, Any]) -> str:
    """One digest of every file the trainer wrote (adapter/ and model/), from metadata.json's checksums."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(metadata.get("checksums", {}).items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def metric_history(output_dir: Path) -> list:
    """One MLflow Metric per logging step and series, from events.jsonl (the last attempt wins a step)."""
    from mlflow.entities import Metric

    from loraflow_trainer.progress import read_events

    points: dict[tuple[str, int], Metric] = {}
    for ev in read_events(output_dir):
        if ev.get("event") != "log" or not isinstance(ev.get("step"), int):
            continue
        if "train_runtime" in ev and "loss" not in ev:
            continue  # the end-of-training summary, not a step
        when = int(float(ev.get("time", 0)) * 1000)
        for field, name in HISTORY_METRICS.items():
            v = ev.get(field)
            if _finite(v):
                points[(name, ev["step"])] = Metric(name, float(v), when, ev["step"])
    return [points[k] for k in sorted(points)]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# -- the MLflow run of a DAG run ---------------------------------------------------------


def _experiment_id(mc, model_name: str, *, create: bool) -> str | None:
    exp = mc.get_experiment_by_name(T.experiment_name(model_name))
    if exp is not None:
        return exp.experiment_id
    return mc.create_experiment(T.experiment_name(model_name)) if create else None


def _ensure_run(mc, model_name: str, run_key: str, tags: dict[str, str]) -> str:
    exp_id = _experiment_id(mc, model_name, create=True)
    runs = search_runs(mc, [exp_id], {T.RUN_KEY: run_key})
    if runs:
        return runs[0].info.run_id
    run = mc.create_run(exp_id, tags={T.RUN_KEY: run_key, **tags, "mlflow.runName": run_key.replace("/", " ")})
    return run.info.run_id


def ensure_run(uri: str, model_name: str, run_key: str, tags: dict[str, str]) -> str:
    """The MLflow run of this DAG run: found by its run key, or created with ``tags`` (once; retries find it)."""
    with reachable(uri):
        return _ensure_run(mlflow_client(uri), model_name, run_key, tags)


def close_run(uri: str, model_name: str, run_key: str, status: str) -> str | None:
    """End this DAG run's MLflow run with the pipeline's true status (FINISHED or FAILED); None when it has none.

    Creates nothing: a DAG run that never opened an MLflow run has none to close.
    """
    with reachable(uri):
        mc = mlflow_client(uri)
        exp_id = _experiment_id(mc, model_name, create=False)
        runs = search_runs(mc, [exp_id], {T.RUN_KEY: run_key}) if exp_id else []
        if not runs:
            return None
        run_id = runs[0].info.run_id
        mc.set_tag(run_id, T.PIPELINE_STATUS, status)
        mc.set_terminated(run_id, status=status)
        return run_id


def _log_run(
    mc, run_id: str, workspace: Path, params: dict[str, Any], metrics: dict[str, Any], with_model: bool = True
) -> None:
    """Params, metrics, the per-step curves and (``with_model``) the model and the trainer's files."""
    from mlflow.entities import Metric, Param

    existing = mc.get_run(run_id).data.params
    plist = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in existing]
    mlist = [Metric(k, float(v), 0, 0) for k, v in sorted(metrics.items()) if _finite(v)]
    for i in range(0, max(len(plist), 1), 100):
        mc.log_batch(run_id, params=plist[i : i + 100], metrics=mlist if i == 0 else [])
    out = workspace / contract.OUTPUT_DIR
    if not mc.get_metric_history(run_id, "loss"):  # a retried register does not log the curves twice
        history = metric_history(out)
        for i in range(0, len(history), 1000):
            mc.log_batch(run_id, metrics=history[i : i + 1000])
    if not with_model:
        return
    mc.log_artifacts(run_id, str(out / contract.MODEL_DIR), T.MODEL_ARTIFACT)
    for name in contract.OUTPUT_FILES:
        if (out / name).exists():
            mc.log_artifact(run_id, str(out / name))
    for rel in (contract.DATA_REPORT_FILE, contract.DATASET_SCHEMA_FILE):
        if (workspace / rel).exists():
            mc.log_artifact(run_id, str(workspace / rel), T.DATA_ARTIFACTS)


def _log_dataset(mc, run_id: str, workspace: Path, source: str, name: str) -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    for split, rel in (("train", contract.TRAIN_FILE), ("eval", contract.EVAL_FILE)):
        path = workspace / rel
        if not path.exists():
            continue
        ds = mlflow.data.from_pandas(pd.read_parquet(path), source=source, name=f"{name}-{split}")
        context = [InputTag("mlflow.data.context", split)]
        mc.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=context)])


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return s[:6000]


# -- the model version -------------------------------------------------------------------


def register(
    uri: str,
    *,
    name: str,
    run_key: str,
    workspace: Path,
    params: dict[str, Any],
    tags: dict[str, str],
    gate_metric: str,
    dataset_source: str,
    run_time: str | None = None,
    gate: Any = None,
) -> Registration:
    """Log the run and register its model as a version of ``name``; move aliases. Idempotent.

    ``gate`` (a ``loraflow.gate.Decision`` from this run's evaluate task), when given, decides
    the champion instead of comparing recorded ``gate_metric`` values; its numbers and
    reason become version tags and an HTML report artifact of the run.

    ``run_time`` (the DAG run's logical date, ISO 8601) orders versions: aliases only move
    forward in it (``aliases.advance``). A run that already has a version registers nothing
    new, and refuses outright if the workspace's outputs are no longer the bytes that
    version holds (its train task was re-run after it was registered).
    """
    from mlflow.exceptions import MlflowException

    out = workspace / contract.OUTPUT_DIR
    digest = output_digest(verify_outputs(out))
    metrics = json.loads((out / contract.METRICS_FILE).read_text())
    mc = mlflow_client(uri)
    with reachable(uri):
        run_id = _ensure_run(mc, name, run_key, tags)
        existing = _existing_version(mc, name, run_key)
        if existing is None:
            _log_run(mc, run_id, workspace, params, metrics)
            if not mc.get_run(run_id).inputs.dataset_inputs:
                _log_dataset(mc, run_id, workspace, dataset_source, name)
            with contextlib.suppress(MlflowException):  # it exists already
                mc.create_registered_model(name, description="LoRA adapters fine-tuned by loraflow")
            gate_value = metrics.get(gate_metric)
            version_tags = {
                T.RUN_KEY: run_key,
                **tags,
                T.GATE_METRIC: gate_metric,
                T.GATE_VALUE: "" if gate_value is None else str(gate_value),
                T.ADAPTER_SHA256: digest,
                **({T.RUN_TIME: run_time} if run_time else {}),
            }
            version_tags.update(cost.version_tags(metrics))  # devices, device/GPU-seconds, tokens/s per device, cost
            artifact_uri = mc.get_run(run_id).info.artifact_uri
            mv = mc.create_model_version(name, f"{artifact_uri}/{T.MODEL_ARTIFACT}", run_id=run_id, tags=version_tags)
            version = _dedupe(mc, name, run_key, mv.version)
            created = True
        else:
            _require_same_outputs(mc, name, existing, digest, out)
            version, created = existing, False
        if gate is not None:
            _log_gate(mc, run_id, name, version, workspace, gate)
        champion, notes = aliases.advance(mc, name, version, gate_metric, metrics.get(gate_metric), gate)
        now_on = sorted(mc.get_model_version(name, version).aliases)
    return Registration(name, version, run_id, now_on, champion, created, tuple(notes))


def log_trial(uri: str, name: str, run_key: str, workspace: Path, params: dict[str, Any], tags: dict[str, str]) -> str:
    """A sweep trial's MLflow run (found by its run key, or created with ``tags``) with its params, and, once it
    trained, its metrics, curves and eval.json; no model (a registered trial's version logs that). Idempotent."""
    out = workspace / contract.OUTPUT_DIR
    with reachable(uri):
        mc = mlflow_client(uri)
        run_id = _ensure_run(mc, name, run_key, tags)
        if (out / contract.SUCCESS).exists():
            metrics = json.loads((out / contract.METRICS_FILE).read_text())
            _log_run(mc, run_id, workspace, params, metrics, with_model=False)
            if (out / contract.EVAL_RESULT_FILE).exists():
                mc.log_artifact(run_id, str(out / contract.EVAL_RESULT_FILE), T.EVALUATION_ARTIFACTS)
        else:  # it never finished training: its settings still say what it tried
            _log_run_params(mc, run_id, params)
    return run_id


def _log_run_params(mc, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    existing = mc.get_run(run_id).data.params
    plist = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(plist), 100):
        mc.log_batch(run_id, params=plist[i : i + 100])


def log_sweep(uri: str, run_id: str, table: dict[str, Any], artifact: str, tags: dict[str, str]) -> None:
    """The sweep's parent run: its table as a JSON artifact (replaced on a retry), ``tags``, the best trial's metric."""
    from mlflow.entities import Metric, RunTag

    metric = table["metric"]
    best = next((t[metric] for t in table["trials"] if t["winner"]), None)
    with reachable(uri):
        mc = mlflow_client(uri)
        mc.log_batch(
            run_id,
            metrics=[Metric(f"best_{metric}", float(best), 0, 0)] if _finite(best) else [],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        path = Path(artifact)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / path.name).write_text(json.dumps(table, indent=2, default=str))
            mc.log_artifact(run_id, str(Path(tmp) / path.name), str(path.parent))


def registered_version(uri: str, name: str, run_key: str) -> str | None:
    """The version this DAG run registered, if any (the train task asks before retraining)."""
    with reachable(uri):
        return _existing_version(mlflow_client(uri), name, run_key)


def is_registered(uri: str, name: str, fingerprint: str) -> bool:
    """Whether a version of ``name`` was already trained on this fingerprint (data + settings)."""
    with reachable(uri):
        return bool(search_versions(mlflow_client(uri), name, {T.FINGERPRINT: fingerprint}))


def _existing_version(mc, name: str, run_key: str) -> str | None:
    found = search_versions(mc, name, {T.RUN_KEY: run_key})
    return found[0].version if found else None


def _require_same_outputs(mc, name: str, version: str, digest: str, out: Path) -> None:
    """The registry never points at bytes other than the ones it holds: refuse a retrained workspace."""
    from mlflow.exceptions import MlflowException

    mv = mc.get_model_version(name, version)
    theirs = (mv.tags or {}).get(T.ADAPTER_SHA256)
    if not theirs and mv.run_id:  # registered before the digest tag existed: read the run's metadata.json
        with tempfile.TemporaryDirectory() as tmp:
            try:
                theirs = output_digest(
                    json.loads(Path(mc.download_artifacts(mv.run_id, contract.METADATA_FILE, tmp)).read_text())
                )
            except (OSError, ValueError, MlflowException):
                theirs = None
    if theirs and theirs != digest:
        raise RegistryError(
            f"{out} is not what version {version} of {name} holds (output digest {digest[:12]}, "
            f"registered {theirs[:12]}): this run's train task was re-run after it was registered, "
            "and the registry keeps the bytes it registered; trigger a new DAG run to register a retrained adapter"
        )


def _dedupe(mc, name: str, run_key: str, version: str) -> str:
    """Keep the oldest version of this run key: a POST retried after a 5xx may have made two."""
    found = search_versions(mc, name, {T.RUN_KEY: run_key})
    for extra in found[1:]:
        mc.delete_model_version(name, extra.version)
    return found[0].version if found else version


def _log_gate(mc, run_id: str, name: str, version: str, workspace: Path, gate: Any) -> None:
    """The gate's decision as version tags, and eval.json plus the HTML report as run artifacts."""
    from loraflow import gate as gate_mod

    for key, value in gate.tags().items():
        mc.set_model_version_tag(name, version, key, value)
    out = workspace / contract.OUTPUT_DIR
    evaluation = out / contract.EVAL_RESULT_FILE
    ev = json.loads(evaluation.read_text())
    try:
        losses = [m.value for m in metric_history(out) if m.key == "loss"]
    except Exception:  # no per-step events from this trainer: the report has no curve
        losses = []
    mc.log_artifact(run_id, str(evaluation), T.EVALUATION_ARTIFACTS)
    report = Path(gate_mod.REPORT_ARTIFACT)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / report.name).write_text(gate_mod.report_html(gate, ev, name, version, losses))
        mc.log_artifact(run_id, str(Path(tmp) / report.name), str(report.parent))


def register_export(uri: str, info: dict[str, Any], out: Path, name: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """Register an exported merged model as a version of ``name``, linked both ways to its adapter version.

    The merged version's source is the HF model directory (``from_pretrained`` loads it once
    downloaded); tags name the adapter version and the base. Registering the same adapter
    version again returns the version registered before.
    """
    from mlflow.exceptions import MlflowException

    mc = mlflow_client(uri)
    source = f"{info['name']}/{info['version']}"
    base = lineage["base"].get("reference") or {}
    tags = {
        T.SOURCE_MODEL: info["name"],
        T.SOURCE_VERSION: info["version"],
        T.EXPORT_FORMAT: lineage["format"],
        T.BASE_REF: str(base.get("name") or base.get("id") or ""),
        T.BASE_SHA256: str(base.get("sha256") or ""),
        T.EXPORT_KEY: f"{source}/{lineage['format']}",
    }
    # MLflow prints run links on stdout; the CLI's stdout is its --json answer.
    with reachable(uri, interactive=True), contextlib.redirect_stdout(sys.stderr):
        found = search_versions(mc, name, {T.EXPORT_KEY: tags[T.EXPORT_KEY]})
        if found:
            return {"name": name, "version": str(found[0].version), "created": False}
        exp_id = _experiment_id(mc, info["name"], create=True)
        run = mc.create_run(exp_id, tags={**tags, "mlflow.runName": f"merge {source}"})
        mc.log_artifacts(run.info.run_id, str(out), "merged")
        mc.set_terminated(run.info.run_id, "FINISHED")
        with contextlib.suppress(MlflowException):  # it exists already
            mc.create_registered_model(
                name, description=f"{info['name']} adapters merged into their base model by loraflow"
            )
        mv = mc.create_model_version(name, f"{run.info.artifact_uri}/merged", run_id=run.info.run_id, tags=tags)
        mc.set_model_version_tag(info["name"], info["version"], T.MERGED_VERSION, f"{name}/{mv.version}")
    return {"name": name, "version": str(mv.version), "created": True, "mlflow_run_id": run.info.run_id}
