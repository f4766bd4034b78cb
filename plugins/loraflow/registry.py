"""The one module that writes to MLflow: runs, params, metrics, artifacts, versions, aliases.

Idempotency is ours (the MLflow client retries POSTs, and a register task may be retried
after a crash): the MLflow run and the model version carry the tag ``loraflow.run_key``
(``<dag_id>/<run_id>``, no try number), and every step looks for its tagged result before
creating one. Aliases are read with ``get_model_version_by_alias`` (the SQL store returns
no aliases from ``search_model_versions``). A server that cannot be reached raises
``RegistryUnavailable`` (retryable); the outputs stay in the workspace for the retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow import cost
from loraflow.errors import RegistryError, RegistryUnavailable

TAG_PREFIX = "loraflow."
RUN_KEY = "loraflow.run_key"
DAG_ID = "loraflow.dag_id"
RUN_ID = "loraflow.run_id"
FINGERPRINT = "loraflow.data_fingerprint"
SPEC_HASH = "loraflow.spec_hash"
BASE_MODEL = "loraflow.base_model"
IMAGE = "loraflow.image"
IMAGE_DIGEST = "loraflow.image_digest"
GATE_METRIC = "loraflow.gate_metric"
GATE_VALUE = "loraflow.gate_value"
RUNTIME = "loraflow.runtime"
PROMOTION_REASON = "loraflow.promotion_reason"
# Where a version came from, portably: the base as the model cache's name (or hub id@commit)
# with its weights hash, and the code that trained it.
BASE_REF = "loraflow.base_ref"
BASE_SHA256 = "loraflow.base_sha256"
LORAFLOW_VERSION = "loraflow.version"
TRAINER_VERSION = "loraflow.trainer_version"
GIT_COMMIT = "loraflow.git_commit"  # the plugin/DAG checkout that registered the version
TRAINER_GIT_COMMIT = "loraflow.trainer_git_commit"  # the trainer source (local runs; docker: the image digest)
RUN_TIME = "loraflow.run_time"  # the run's logical date (run_after when it has none): aliases move forward in it
ADAPTER_SHA256 = "loraflow.adapter_sha256"  # digest of the registered output's checksums (metadata.json)
ALIAS_NOTE = "loraflow.alias_note"  # why register left an alias where it was
CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = ("loss", "perplexity")


def experiment_name(model_name: str) -> str:
    return f"loraflow/{model_name}"


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


@contextlib.contextmanager
def reachable(uri: str) -> Iterator[None]:
    """Turn "cannot reach the server" into RegistryUnavailable; let real refusals through."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise RegistryUnavailable(f"MLflow at {uri} is unreachable ({type(exc).__name__}); the task retries, outputs stay in the workspace") from None
    except MlflowException as exc:
        text = str(exc)
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        if any(s in text for s in _UNREACHABLE):
            raise RegistryUnavailable(f"MLflow at {uri} is unreachable ({first}); the task retries, outputs stay in the workspace") from None
        if "failed with error code 403" in text or "failed with error code 401" in text:
            raise RegistryError(f"MLflow at {uri} refused loraflow ({first}); set MLFLOW_TRACKING_USERNAME/PASSWORD, or start the server with --allowed-hosts for this host name") from None
        raise


# How the 3.17 client words "no answer" (transport errors, timeouts, a 5xx page from a proxy).
_UNREACHABLE = ("failed with exception", "failed with timeout exception", "Max retries exceeded", "Connection refused",
                "Read timed out", "failed with error code 5")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    champion_version: str | None
    created: bool
    notes: tuple[str, ...] = ()  # why an alias was not moved to this version


def verify_outputs(output_dir: Path) -> dict[str, Any]:
    """Refuse outputs that are incomplete or altered since the trainer wrote them."""
    if not (output_dir / "_SUCCESS").exists():
        raise RegistryError(f"{output_dir} has no _SUCCESS marker: training did not finish; re-run the train task")
    metadata = json.loads((output_dir / "metadata.json").read_text())
    for rel, expected in metadata.get("checksums", {}).items():
        path = output_dir / rel
        if not path.exists():
            raise RegistryError(f"{path} listed in metadata.json is missing; re-run the train task")
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        if h != expected:
            raise RegistryError(f"{path} does not match its checksum in metadata.json (corrupted or altered); re-run the train task")
    check_privacy(output_dir)
    return metadata


def check_privacy(output_dir: Path) -> None:
    """Refuse a DP-SGD run whose recorded epsilon exceeds its target, or that has no accounting.

    The trainer never writes such outputs; this guards the registry against older trainers
    and hand-made output directories, so no version over its privacy target is registered.
    """
    metrics_path, accounting_path = output_dir / "metrics.json", output_dir / "dp_accounting.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if "epsilon" not in metrics and not accounting_path.exists():
        return  # not a DP run
    if not accounting_path.exists():
        raise RegistryError(f"{output_dir} reports epsilon but has no dp_accounting.json, so the privacy spent cannot be "
                            "checked; re-run the train task with this loraflow version")
    accounting = json.loads(accounting_path.read_text())
    target = float(accounting.get("target_epsilon", metrics.get("dp_target_epsilon", math.inf)))
    for where, eps in (("dp_accounting.json", accounting.get("epsilon")), ("metrics.json", metrics.get("epsilon"))):
        if eps is None or not math.isfinite(float(eps)) or float(eps) > target * (1 + 1e-9):
            raise RegistryError(f"{output_dir}/{where} records epsilon {eps} over the target {target:g}: a version over its "
                                "privacy target is never registered; retrain within the budget (lower max_steps or raise "
                                "dp_target_epsilon)")


def output_digest(metadata: dict[str, Any]) -> str:
    """One digest of every file the trainer wrote (adapter/ and model/), from metadata.json's checksums."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(metadata.get("checksums", {}).items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def find_version(mc, name: str, tag: str, value: str):
    """Model versions of ``name`` whose ``tag`` equals ``value`` (oldest first)."""
    versions = mc.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    return sorted(versions, key=lambda v: int(v.version))


def is_registered(uri: str, name: str, fingerprint: str) -> bool:
    """Whether a version of ``name`` was already trained on this fingerprint (data + settings)."""
    from mlflow.exceptions import MlflowException

    mc = client(uri)
    with reachable(uri):
        try:
            return bool(find_version(mc, name, FINGERPRINT, fingerprint))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return False
            raise


def _run_for_key(mc, experiment: str, run_key: str, tags: dict[str, str]) -> str:
    exp = mc.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mc.create_experiment(experiment)
    runs = mc.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = mc.create_run(exp_id, tags={**tags, "mlflow.runName": run_key.replace("/", " ")})
    return run.info.run_id


def start_run(uri: str, model_name: str, run_key: str, tags: dict[str, str]) -> str:
    """The MLflow run of this DAG run (created once, found again on retries)."""
    with reachable(uri):
        return _run_for_key(client(uri), experiment_name(model_name), run_key, {RUN_KEY: run_key, **tags})


def _log_run(mc, run_id: str, workspace: Path, params: dict[str, Any], metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param

    existing = mc.get_run(run_id).data.params
    plist = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in existing]
    mlist = [Metric(k, float(v), 0, 0) for k, v in sorted(metrics.items())
             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, max(len(plist), 1), 100):
        mc.log_batch(run_id, params=plist[i:i + 100], metrics=mlist if i == 0 else [])
    out = workspace / "output"
    if not mc.get_metric_history(run_id, "loss"):  # a retried register does not log the curves twice
        history = metric_history(out)
        for i in range(0, len(history), 1000):
            mc.log_batch(run_id, metrics=history[i:i + 1000])
    mc.log_artifacts(run_id, str(out / "model"), "model")
    for name in ("metrics.json", "metadata.json", "samples.jsonl", "dp_accounting.json"):
        if (out / name).exists():
            mc.log_artifact(run_id, str(out / name))
    for name in ("data_report.json", "dataset_schema.json"):
        if (workspace / name).exists():
            mc.log_artifact(run_id, str(workspace / name), "data")


# Per-step series from the trainer's events (output/events.jsonl) -> MLflow metric names. The
# names are those of HF's own MLflow integration; the windowed throughput has its own name
# because ``tokens_per_second`` is the run's overall figure in metrics.json.
HISTORY_METRICS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
                   "tokens_per_second": "step_tokens_per_second", "eval_loss": "eval_loss"}


def metric_history(output_dir: Path) -> list:
    """One MLflow Metric per logging step and series, from events.jsonl (the last attempt wins a step)."""
    from loraflow_trainer.progress import read_events
    from mlflow.entities import Metric

    points: dict[tuple[str, int], Metric] = {}
    for ev in read_events(output_dir):
        if ev.get("event") != "log" or not isinstance(ev.get("step"), int):
            continue
        if "train_runtime" in ev and "loss" not in ev:
            continue  # the end-of-training summary, not a step
        when = int(float(ev.get("time", 0)) * 1000)
        for field, name in HISTORY_METRICS.items():
            v = ev.get(field)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                points[(name, ev["step"])] = Metric(name, float(v), when, ev["step"])
    return [points[k] for k in sorted(points)]


def _log_dataset(mc, run_id: str, workspace: Path, source: str, name: str) -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    for split in ("train", "eval"):
        path = workspace / "data" / f"{split}.parquet"
        if not path.exists():
            continue
        ds = mlflow.data.from_pandas(pd.read_parquet(path), source=source, name=f"{name}-{split}")
        mc.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)])])


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return s[:6000]


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
    forward in it (``_move_aliases``). A run that already has a version registers nothing
    new, and refuses outright if the workspace's outputs are no longer the bytes that
    version holds (its train task was re-run after it was registered).
    """
    from mlflow.exceptions import MlflowException

    out = workspace / "output"
    digest = output_digest(verify_outputs(out))
    metrics = json.loads((out / "metrics.json").read_text())
    mc = client(uri)
    with reachable(uri):
        run_id = _run_for_key(mc, experiment_name(name), run_key, {RUN_KEY: run_key, **tags})
        existing = _existing_version(mc, name, run_key)
        if existing is None:
            _log_run(mc, run_id, workspace, params, metrics)
            if not mc.get_run(run_id).inputs.dataset_inputs:
                _log_dataset(mc, run_id, workspace, dataset_source, name)
            with contextlib.suppress(MlflowException):
                mc.create_registered_model(name, description="LoRA adapters fine-tuned by loraflow")
            gate_value = metrics.get(gate_metric)
            version_tags = {RUN_KEY: run_key, **tags, GATE_METRIC: gate_metric,
                            GATE_VALUE: "" if gate_value is None else str(gate_value), ADAPTER_SHA256: digest,
                            **({RUN_TIME: run_time} if run_time else {})}
            artifact_uri = mc.get_run(run_id).info.artifact_uri
            version_tags.update(cost.version_tags(metrics))  # devices, device/GPU-seconds, tokens/s per device, cost
            mv = mc.create_model_version(name, f"{artifact_uri}/model", run_id=run_id, tags=version_tags)
            version = _dedupe(mc, name, run_key, mv.version)
            created = True
        else:
            _require_same_outputs(mc, uri, name, existing, digest, out)
            version, created = existing, False
        if gate is not None:
            _log_gate(mc, run_id, name, version, workspace, gate)
        champion, notes = _move_aliases(mc, name, version, gate_metric, metrics.get(gate_metric), gate)
        aliases = sorted(mc.get_model_version(name, version).aliases)
    return Registration(name, version, run_id, aliases, champion, created, tuple(notes))


def registered_version(uri: str, name: str, run_key: str) -> str | None:
    """The version this DAG run registered, if any (the train task asks before retraining)."""
    mc = client(uri)
    with reachable(uri):
        return _existing_version(mc, name, run_key)


def _existing_version(mc, name: str, run_key: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        found = find_version(mc, name, RUN_KEY, run_key)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return None
        raise
    return found[0].version if found else None


def _require_same_outputs(mc, uri: str, name: str, version: str, digest: str, out: Path) -> None:
    """The registry never points at bytes other than the ones it holds: refuse a retrained workspace."""
    import tempfile

    from mlflow.exceptions import MlflowException

    mv = mc.get_model_version(name, version)
    theirs = (mv.tags or {}).get(ADAPTER_SHA256)
    if not theirs and mv.run_id:  # registered before the digest tag existed: read the run's metadata.json
        with tempfile.TemporaryDirectory() as tmp:
            try:
                theirs = output_digest(json.loads(Path(mc.download_artifacts(mv.run_id, "metadata.json", tmp)).read_text()))
            except (OSError, ValueError, MlflowException):
                theirs = None
    if theirs and theirs != digest:
        raise RegistryError(
            f"{out} is not what version {version} of {name} holds (output digest {digest[:12]}, registered {theirs[:12]}): "
            f"this run's train task was re-run after it was registered, and the registry keeps the bytes it registered; "
            f"trigger a new DAG run to register a retrained adapter"
        )


def _dedupe(mc, name: str, run_key: str, version: str) -> str:
    """Keep the oldest version of this run key: a POST retried after a 5xx may have made two."""
    found = find_version(mc, name, RUN_KEY, run_key)
    for extra in found[1:]:
        mc.delete_model_version(name, extra.version)
    return found[0].version if found else version


def _alias_version(mc, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _move_aliases(mc, name: str, version: str, gate_metric: str, value: Any, gate: Any = None) -> tuple[str | None, list[str]]:
    """challenger -> this version, champion -> this version if it beats the champion; forward only.

    Neither alias moves to a version older than the one it is on (``_is_older``): clearing
    and re-running register of an old run leaves both where they are. Each alias left in
    place gets its reason in the version's ``loraflow.alias_note`` tag. With a ``gate``
    decision the champion moves only if the gate promotes against the champion it was
    evaluated with. A version champion was rolled back from is never promoted again here.
    Every move is logged (``aliases.move``). Returns (champion, notes).
    """
    from loraflow import aliases as alias_log

    mine = mc.get_model_version(name, version)
    by = f"register of {(mine.tags or {}).get(RUN_KEY, 'v' + str(version))}"

    def set_alias(alias: str, reason: str) -> None:
        alias_log.move(mc, name, alias, version, by=by, kind="register", reason=reason)

    notes: list[str] = []
    challenger = _alias_version(mc, name, CHALLENGER)
    if challenger is None or not _is_older(mine, challenger):
        if challenger is None or challenger.version != version:
            set_alias(CHALLENGER, "newest registered version")
    else:
        notes.append(f"challenger stays on v{challenger.version}: {_why_older(mine, challenger)}")
    champion_mv = _alias_version(mc, name, CHAMPION)
    champion = champion_mv.version if champion_mv else None
    rolled_back = (mine.tags or {}).get(alias_log.ROLLED_BACK)
    if champion_mv is None:
        if gate is not None and not gate.promote:
            notes.append(f"no champion set: {gate.reason}")
        elif challenger is None or not _is_older(mine, challenger):
            reason = gate.reason if gate is not None else "first version"
            set_alias(CHAMPION, reason)
            mc.set_model_version_tag(name, version, PROMOTION_REASON, reason[:4900])
            champion = version
        else:
            notes.append(f"no champion set: v{version} is older than the challenger v{challenger.version}")
    elif champion_mv.version != version:
        theirs = _gate_value(mc, champion_mv, gate_metric)
        if _is_older(mine, champion_mv):
            notes.append(f"champion stays on v{champion_mv.version}: {_why_older(mine, champion_mv)}")
        elif rolled_back:
            notes.append(f"champion stays on v{champion_mv.version}: champion was rolled back from v{version} ({rolled_back})")
        elif gate is not None:
            if gate.champion_version != champion_mv.version:
                notes.append(f"champion stays on v{champion_mv.version}: evaluate compared with "
                             f"{'v' + gate.champion_version if gate.champion_version else 'no champion'}, and the champion has moved since; "
                             f"clear evaluate and register to compare again")
            elif gate.promote:
                set_alias(CHAMPION, gate.reason)
                mc.set_model_version_tag(name, version, PROMOTION_REASON, gate.reason[:4900])
                champion = version
            else:
                notes.append(f"champion stays on v{champion_mv.version}: {gate.reason}")
        elif value is not None and (theirs is None or _better(float(value), theirs, gate_metric)):
            reason = f"{gate_metric} {float(value):.6g} beats v{champion_mv.version}'s {theirs}"
            set_alias(CHAMPION, reason)
            mc.set_model_version_tag(name, version, PROMOTION_REASON, reason)
            champion = version
        else:
            notes.append(f"champion stays on v{champion_mv.version}: {gate_metric} {value} does not beat its {theirs}")
    if notes:
        mc.set_model_version_tag(name, version, ALIAS_NOTE, "; ".join(notes)[:4900])
    elif ALIAS_NOTE in (mine.tags or {}):
        mc.delete_model_version_tag(name, version, ALIAS_NOTE)
    return champion, notes


def _log_gate(mc, run_id: str, name: str, version: str, workspace: Path, gate: Any) -> None:
    """The gate's decision as version tags, and eval.json plus the HTML report as run artifacts."""
    import tempfile

    from loraflow import gate as gate_mod

    for key, value in gate.tags().items():
        mc.set_model_version_tag(name, version, key, value)
    out = workspace / "output"
    ev = json.loads((out / "eval.json").read_text())
    try:
        losses = [m.value for m in metric_history(out) if m.key == "loss"]
    except Exception:  # no per-step events from this trainer: the report has no curve
        losses = []
    mc.log_artifact(run_id, str(out / "eval.json"), "evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / Path(gate_mod.REPORT_ARTIFACT).name
        report.write_text(gate_mod.report_html(gate, ev, name, version, losses))
        mc.log_artifact(run_id, str(report), str(Path(gate_mod.REPORT_ARTIFACT).parent))


def _order(mv) -> tuple:
    from datetime import datetime

    raw = (mv.tags or {}).get(RUN_TIME)
    try:
        when = datetime.fromisoformat(raw) if raw else None
    except ValueError:
        when = None
    return when, int(mv.version)


def _is_older(mv, other) -> bool:
    """Whether ``mv`` comes before ``other``: by run time when both have one, else by creation (version number)."""
    (t1, v1), (t2, v2) = _order(mv), _order(other)
    if t1 is not None and t2 is not None and t1 != t2:
        return t1 < t2
    return v1 < v2


def _why_older(mv, other) -> str:
    (t1, _), (t2, _) = _order(mv), _order(other)
    if t1 is not None and t2 is not None and t1 != t2:
        return f"v{mv.version} is from the run of {t1.isoformat()}, older than v{other.version}'s run of {t2.isoformat()}"
    return f"v{mv.version} was registered before v{other.version}"


def _gate_value(mc, mv, metric: str) -> float | None:
    if mv.run_id:
        value = mc.get_run(mv.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    raw = (mv.tags or {}).get(GATE_VALUE)
    return float(raw) if raw else None


def _better(ours: float, theirs: float, metric: str) -> bool:
    return ours < theirs if lower_is_better(metric) else ours > theirs


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close the MLflow run with the pipeline's true status (FINISHED or FAILED)."""
    with reachable(uri):
        mc = client(uri)
        mc.set_tag(run_id, "loraflow.pipeline_status", status)
        mc.set_terminated(run_id, status=status)


def http_defaults() -> None:
    """Short client timeouts inside Airflow tasks: Airflow's retries (with backoff) do the waiting."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
