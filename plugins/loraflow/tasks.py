"""What each task of ``loraflow_finetune`` does, as plain functions of the task context.

The DAG file only wires these together; each one is importable and testable without a
scheduler. Failures a retry cannot fix raise ``AirflowFailException`` (no retries wasted);
failures a retry can fix (MLflow down) raise normally so the task's retries apply.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from loraflow import config, gate, registry, secrets, sweep, workspace
from loraflow.errors import LoraflowError
from loraflow.runtimes.docker import remove_containers
from loraflow.workspace import Pipeline
from loraflow_trainer import contract

SCHEDULED_RUN_TYPES = ("scheduled", "asset_triggered", "asset_materialization")


def _mlflow_env() -> None:
    """Client settings and credentials (from the MLflow connection) for this task process."""
    registry.http_defaults()
    secrets.apply_mlflow_credentials()


def _fail(exc: LoraflowError):
    if exc.retryable:
        raise exc
    raise AirflowFailException(str(exc)) from None


def _run_type(context) -> str:
    dag_run = context["dag_run"]
    rt = getattr(dag_run, "run_type", "manual")
    return str(getattr(rt, "value", rt))


def prepare(context) -> str:
    """Validate the trigger params into job.json in a fresh run workspace; return its path."""
    dag_run = context["dag_run"]
    try:
        # Airflow merges the trigger conf into the params (unknown names included); the raw conf's
        # names are checked too, so a conf key can never slip past the form's list.
        pipeline = workspace.prepare(
            dict(context["params"]),
            dag_run.dag_id,
            dag_run.run_id,
            _run_type(context),
            raw_keys=list(getattr(dag_run, "conf", None) or {}),
        )
    except LoraflowError as exc:
        _fail(exc)
    return pipeline.workspace


def check_data(ws: str) -> dict[str, Any]:
    from loraflow.data import checks  # pandas, pandera, pyarrow: only the data tasks pay for them

    pipeline = Pipeline.load(ws)
    job = workspace.load_job(ws)
    tokenizer = Path(pipeline.base_model_host) / "tokenizer.json"
    try:
        report = checks.check(
            Path(pipeline.dataset_path),
            job.data.data_format,
            max_seq_length=job.training.max_seq_length,
            min_rows=pipeline.min_rows,
            tokenizer_json=tokenizer if tokenizer.exists() else None,
            eval_path=Path(pipeline.eval_dataset_path) if pipeline.eval_dataset_path else None,
            report_path=Path(ws) / contract.DATA_REPORT_FILE,
        )
    except LoraflowError as exc:
        _fail(exc)
    return {"rows": report["rows"], "passed": report["passed"]}


def preprocess(ws: str) -> dict[str, Any]:
    from loraflow.data.preprocess import preprocess as _preprocess

    pipeline = Pipeline.load(ws)
    eval_source = Path(pipeline.eval_dataset_path) if pipeline.eval_dataset_path else None
    try:
        result = _preprocess(
            Path(pipeline.dataset_path), workspace.load_job(ws), Path(ws), pipeline.eval_fraction, eval_source
        )
    except LoraflowError as exc:  # a split the trainer would refuse: fail here, before any GPU time
        _fail(exc)
    return result.__dict__


def should_train(ws: str) -> bool:
    """Manual runs always train; scheduled/asset runs train only on a new fingerprint."""
    pipeline = Pipeline.load(ws)
    if pipeline.run_type not in SCHEDULED_RUN_TYPES:
        return True
    fingerprint = json.loads((Path(ws) / contract.FINGERPRINT_FILE).read_text())["fingerprint"]
    _mlflow_env()
    seen = registry.is_registered(config.tracking_uri(), pipeline.registered_model_name, fingerprint)
    if seen:
        print(
            f"loraflow: data fingerprint {fingerprint[:12]} with these settings is already registered "
            f"in {pipeline.registered_model_name}; nothing new to train"
        )
    return not seen


def _lineage(pipeline: Pipeline, job, train_result: dict[str, Any] | None) -> dict[str, str]:
    train_result = train_result or {}
    return {
        registry.DAG_ID: pipeline.dag_id,
        registry.RUN_ID: pipeline.run_id,
        registry.FINGERPRINT: job.data_fingerprint or "",
        registry.SPEC_HASH: job.spec_hash(),
        registry.BASE_MODEL: job.model.base_model,
        registry.RUNTIME: str(train_result.get("runtime") or pipeline.runtime),
        registry.IMAGE: str(train_result.get("image") or ""),
        registry.IMAGE_DIGEST: str(train_result.get("image_digest") or ""),
        **_provenance(pipeline),
    }


def _provenance(pipeline: Pipeline) -> dict[str, str]:
    """The base as a portable reference and the code versions, from the trainer's metadata.json (once trained)."""
    import loraflow

    path = Path(pipeline.workspace) / contract.OUTPUT_DIR / contract.METADATA_FILE
    meta = json.loads(path.read_text()) if path.exists() else {}
    ref, code = meta.get("base_model_ref") or {}, meta.get("code") or {}
    base_ref = {"cache": ref.get("name"), "hub": f"{ref.get('id')}@{ref.get('revision')}"}.get(ref.get("kind"), "")
    return {
        registry.BASE_REF: base_ref or "",
        registry.BASE_SHA256: ref.get("sha256") or "",
        registry.LORAFLOW_VERSION: loraflow.__version__,
        registry.TRAINER_VERSION: code.get("loraflow_trainer") or "",
        registry.GIT_COMMIT: _git_commit(),
        registry.TRAINER_GIT_COMMIT: code.get("git_commit") or "",
    }


def _git_commit() -> str:
    """The commit of the plugin/DAG checkout ($LORAFLOW_GIT_COMMIT where it is installed without .git)."""
    import os
    import subprocess

    if os.environ.get("LORAFLOW_GIT_COMMIT"):
        return os.environ["LORAFLOW_GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_params(pipeline: Pipeline, job) -> dict[str, Any]:
    """The MLflow params of a run: every job spec setting and the pipeline settings."""
    return {
        **job.flat_params(),
        "dataset_path": pipeline.dataset_path,
        "eval_fraction": pipeline.eval_fraction,
        "eval_dataset_path": pipeline.eval_dataset_path or "",
        "registered_model_name": pipeline.registered_model_name,
        "promotion_metric": pipeline.promotion_metric,
        "runtime": pipeline.runtime,
        "gate_margin": pipeline.gate_margin,
        "max_epsilon": pipeline.max_epsilon,
        "behaviour_suite_path": pipeline.behaviour_suite_path or "",
    }


def register(ws: str, train_result: dict[str, Any] | None, context) -> dict[str, Any]:
    pipeline = Pipeline.load(ws)
    job = workspace.load_job(ws)
    _mlflow_env()
    # The promotion decision from the evaluate task's same-exam scores (None without eval.json).
    decision = gate.from_workspace(
        Path(ws),
        margin=pipeline.gate_margin,
        max_epsilon=pipeline.max_epsilon,
        dp_enabled=job.privacy.dp_enabled,
        allow_behaviour_regressions=pipeline.allow_behaviour_regressions,
    )
    if decision is not None:
        print(f"loraflow: gate: {'promote' if decision.promote else 'keep the champion'}: {decision.reason}")
    reg = _register(pipeline, job, _lineage(pipeline, job, train_result), decision, context)
    context["ti"].xcom_push(key="mlflow_run_id", value=reg["run_id"])
    return reg


def _register(pipeline: Pipeline, job, tags: dict[str, str], decision, context) -> dict[str, Any]:
    """Register the workspace's adapter as a version (idempotent) and mark the workspace."""
    ws = pipeline.workspace
    try:
        reg = registry.register(
            config.tracking_uri(),
            name=pipeline.registered_model_name,
            run_key=pipeline.run_key,
            workspace=Path(ws),
            params=_run_params(pipeline, job),
            tags=tags,
            gate_metric=pipeline.promotion_metric,
            dataset_source=pipeline.dataset_path,
            run_time=_run_time(context),
            gate=decision,
        )
    except LoraflowError as exc:
        _fail(exc)
    (Path(ws) / REGISTERED_MARKER).write_text(
        json.dumps({"name": reg.name, "version": reg.version, "run_key": pipeline.run_key})
    )
    print(
        f"loraflow: registered {reg.name} version {reg.version} (aliases: {', '.join(reg.aliases) or 'none'}; "
        f"champion is v{reg.champion_version}; {'new' if reg.created else 'already registered by an earlier try'})"
    )
    for note in reg.notes:
        print(f"loraflow: {note}")
    return reg.__dict__


REGISTERED_MARKER = "registered.json"


# -- sweeps (loraflow_sweep; loraflow.sweep) ------------------------------------------------


def prepare_sweep(context) -> str:
    """Validate the trigger params and every trial of the sweep; write the run's and the trials' workspaces."""
    dag_run = context["dag_run"]
    try:
        pipeline = sweep.prepare(
            dict(context["params"]),
            dag_run.dag_id,
            dag_run.run_id,
            _run_type(context),
            raw_keys=list(getattr(dag_run, "conf", None) or {}),
        )
    except LoraflowError as exc:
        _fail(exc)
    return pipeline.workspace


def sweep_trials(ws: str) -> list[str]:
    """Link the checked, preprocessed data into every trial's workspace; the trial workspaces, for the mapping."""
    try:
        return sweep.materialise(ws)
    except LoraflowError as exc:
        _fail(exc)


def register_sweep(ws: str, context) -> dict[str, Any]:
    """Log every trial as a child of the sweep's MLflow run, register the winner (or all), log the sweep's table.

    Runs when every trial is done and at least one evaluated: a trial that failed is in the
    table as "no result" and never wins (the DAG run still fails, through ``outcome``).
    """
    pipeline, job = Pipeline.load(ws), workspace.load_job(ws)
    plan = sweep.load(ws)
    _mlflow_env()
    uri = config.tracking_uri()
    try:
        parent = registry.ensure_run(
            uri,
            pipeline.registered_model_name,
            pipeline.run_key,
            {**_lineage(pipeline, job, None), sweep.TAG_TRIALS: str(len(plan["trials"]))},
        )
    except LoraflowError as exc:
        _fail(exc)
    trials = sweep.results(ws)
    ranked = sweep.rank(trials)
    winner = ranked[0] if ranked else None
    chosen = [winner] if winner is not None and plan["register"] == "best" else ranked[::-1]  # the winner last
    tags_of = {}
    for t in trials:  # every trial is a child run, registered or not
        tp, tjob = Pipeline.load(t.workspace), workspace.load_job(t.workspace)
        trained = context["ti"].xcom_pull(task_ids="trial.train", map_indexes=t.trial)  # its image and digest
        tags_of[t.trial] = {
            **_lineage(tp, tjob, trained if isinstance(trained, dict) else None),
            sweep.PARENT_RUN: parent,
            sweep.TAG_TRIAL: str(t.trial),
            sweep.TAG_OVERRIDES: json.dumps(t.overrides)[:4900],
        }
        try:
            t.extra["mlflow_run_id"] = registry.log_trial(
                uri, tp.registered_model_name, tp.run_key, t.workspace, _run_params(tp, tjob), tags_of[t.trial]
            )
        except LoraflowError as exc:
            _fail(exc)
    for t in chosen:
        decision = t.decision
        if t is not winner:  # registered because sweep_register is all: the winner is the one to promote
            decision = gate.Decision(
                False,
                f"sweep: trial {winner.trial} of this sweep ranked first (eval loss {winner.eval_loss:.4g} against "
                f"{t.eval_loss:.4g}); trial {t.trial} is registered because sweep_register is all",
                t.decision.champion_version,
                t.decision.numbers,
            )
        print(f"loraflow: sweep trial {t.trial} ({json.dumps(t.overrides)}): gate: {decision.reason}")
        tp, tjob = Pipeline.load(t.workspace), workspace.load_job(t.workspace)
        reg = _register(tp, tjob, tags_of[t.trial], decision, context)
        t.extra.update(version=reg["version"], aliases=reg["aliases"])
    table = sweep.table(trials, winner.trial if winner else None)
    try:
        registry.log_sweep(
            uri,
            parent,
            table,
            sweep.TABLE_ARTIFACT,
            {sweep.TAG_WINNER: "" if winner is None else str(winner.trial)},
        )
    except LoraflowError as exc:
        _fail(exc)
    context["ti"].xcom_push(key="mlflow_run_id", value=parent)
    for row in table["trials"]:
        print(
            f"loraflow: sweep trial {row['trial']}: {json.dumps(row['overrides'])}  eval_loss {row['eval_loss']}  "
            f"{row['status']}{'  WINNER' if row['winner'] else ''}"
            f"{'  v' + row['version'] if row.get('version') else ''}"
        )
    if winner is None:
        _fail(
            LoraflowError(
                "no trial of this sweep finished training and evaluation, so none was registered; "
                "see the failed train/evaluate task instances' logs"
            )
        )
    return table


def _run_time(context) -> str | None:
    """The DAG run's place in time: its logical date, or when it was due (manual runs may have no logical date)."""
    dag_run = context.get("dag_run") if hasattr(context, "get") else None
    when = getattr(dag_run, "logical_date", None) or getattr(dag_run, "run_after", None)
    return when.isoformat() if when is not None else None


def refuse_retrain_of_registered(pipeline: Pipeline, log=print) -> None:
    """Refuse to train a DAG run that already has a registered version, before any GPU time.

    Clearing ``train`` of a registered run could go two ways: retrain and register the new
    adapter as a second version, or refuse. loraflow refuses. One DAG run is one version:
    the run key is the idempotency key of both the MLflow run and the version, and the
    version's artifacts live in that MLflow run, so a second version of the same run would
    overwrite or shadow the bytes the first one holds. Retraining is a new DAG run with the
    same conf, which gets its own run key, workspace and version. As a second line, register
    refuses a workspace whose outputs differ from what the run's version holds
    (``registry.registration._require_same_outputs``).
    """
    marker = Path(pipeline.workspace) / REGISTERED_MARKER
    version = json.loads(marker.read_text()).get("version") if marker.exists() else None
    if version is None:
        _mlflow_env()
        try:
            version = registry.registered_version(
                config.tracking_uri(), pipeline.registered_model_name, pipeline.run_key
            )
        except LoraflowError as exc:  # register checks the bytes again, against the registry itself
            log(f"loraflow: could not ask MLflow whether this run is registered ({exc}); training")
            return
    if version is not None:
        _fail(
            LoraflowError(
                f"this DAG run ({pipeline.run_key}) is already registered as version {version} of "
                f"{pipeline.registered_model_name}, so its train task is not re-run: retraining would leave the "
                f"workspace and the registry with different adapters; "
                f"trigger a new DAG run with the same conf to retrain"
            )
        )


FAILED_STATES = ("failed", "upstream_failed")


def pipeline_failed(context) -> bool:
    """Whether any other task of this DAG run failed (teardown's view of the run)."""
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])
    mine = states.get(ti.run_id, {})
    return any(state in FAILED_STATES for task_id, state in mine.items() if task_id != ti.task_id)


def outcome(context) -> dict[str, str]:
    """The DAG run's verdict, its last task: fail when any task the run needed failed.

    Airflow decides a DAG run's state from its leaf tasks only (teardowns ignored), so a
    train task an operator marks failed while register or teardown still runs left the
    run ``success``. This task runs after teardown whatever happened (trigger rule
    all_done) and looks at every other task but the teardown (whose failure Airflow does
    not count either).
    """
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    failed = {t: s for t, s in states.items() if s in FAILED_STATES and t not in (ti.task_id, "teardown")}
    if failed:
        raise AirflowFailException(
            "this DAG run failed: "
            + ", ".join(f"{t} is {s}" for t, s in sorted(failed.items()))
            + "; see those tasks' logs (teardown cleaned up, nothing half-done was registered)"
        )
    return {t: str(s) for t, s in states.items() if t != ti.task_id}


def teardown(ws: str, context) -> dict[str, Any]:
    """Always runs: remove this run's containers, free scratch, close the MLflow run truthfully."""
    pipeline = Pipeline.load(ws)
    failed = pipeline_failed(context)
    removed = remove_containers(pipeline.run_id)  # a sweep's trials too: they carry the DAG run's id
    status = "FAILED" if failed else "FINISHED"
    trials = sweep.trial_workspaces(ws)
    for tws in trials:
        _free_scratch(tws, failed)
    mlflow_run = _close_mlflow_run(pipeline, ws, status, sweep=bool(trials))
    if trials:
        _close_trial_runs(pipeline, trials)
    summary = {
        "status": status,
        "containers_removed": removed,
        "mlflow_run_id": mlflow_run,
        "kept_checkpoints": _free_scratch(Path(ws), failed),
    }
    print(f"loraflow teardown: {json.dumps(summary)}")
    return summary


def _free_scratch(ws: Path, failed: bool) -> bool:
    """Remove a workspace's staging folders, and its checkpoints once it trained in a run that did not fail;
    whether checkpoints are kept."""
    out = ws / contract.OUTPUT_DIR
    registered = (out / contract.SUCCESS).exists() and not failed
    for scratch in list(out.glob(".staging-*")) + ([out / "checkpoints"] if registered else []):
        shutil.rmtree(scratch, ignore_errors=True)
    return (out / "checkpoints").exists()


def _close_trial_runs(pipeline: Pipeline, trials: list[Path]) -> None:
    """End each trial's MLflow run: FINISHED if it trained and was evaluated, FAILED otherwise (none: no run)."""
    uri = config.tracking_uri()
    for tws in trials:
        done = (tws / contract.OUTPUT_DIR / contract.EVAL_RESULT_FILE).exists()
        registry.close_run(
            uri, pipeline.registered_model_name, Pipeline.load(tws).run_key, "FINISHED" if done else "FAILED"
        )


def _close_mlflow_run(pipeline: Pipeline, ws: str, status: str, sweep: bool = False) -> str | None:
    """End this run's MLflow run; a failed pipeline gets a FAILED run even if it never reached register.

    A sweep's run is the parent of its trials' runs; it trains nothing itself.
    """
    _mlflow_env()
    uri = config.tracking_uri()
    if status == "FINISHED" and not sweep and not (Path(ws) / contract.OUTPUT_DIR / contract.SUCCESS).exists():
        return None  # skipped as already registered: nothing was tracked, nothing to close
    if status == "FAILED":  # a run that failed before register gets its MLflow run here, to show the failure
        job = workspace.load_job(ws)
        registry.ensure_run(uri, pipeline.registered_model_name, pipeline.run_key, _lineage(pipeline, job, None))
    return registry.close_run(uri, pipeline.registered_model_name, pipeline.run_key, status)
