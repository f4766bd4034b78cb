"""Sweeps: one DAG run of ``loraflow_sweep`` trains several trials and registers the best.

The ``sweep`` param is a grid (``{"lora_r": [4, 8], "learning_rate": [1e-4, 3e-4]}``: every
combination is a trial) or a list of override objects (``[{"lora_r": 4}, {"lora_r": 16}]``:
one trial each). A trial is the run's form settings with its overrides applied, validated
by ``workspace.build`` exactly as a run of ``loraflow_finetune`` is, in prepare, before
any data is read or anything trains; a sweep of more than ``MAX_TRIALS`` trials is refused.

Each trial has its own workspace ``<run workspace>/trial-<n>/`` (its job.json, pipeline.json,
output/), so the train and evaluate operators work on it unchanged. The data is checked and
preprocessed once, in the run workspace, and linked into every trial (``materialise``):
every trial trains on the same split and is evaluated, with the champion, on the same eval
set, so their scores compare like with like. A trial's run key is
``<dag_id>/<run_id>/trial-<n>``: its own MLflow run (a child of the sweep's parent run, by
MLflow's ``mlflow.parentRunId`` tag) and, if registered, its own version.

The winner is the trial the gate ranks first (``rank``): a trial the gate would promote
beats one it would not; among equals, the lower eval loss on the shared eval set wins.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow import params, workspace
from loraflow.errors import ParamsError
from loraflow.workspace import Pipeline
from loraflow_trainer import contract, spec

DAG_ID = "loraflow_sweep"
MAX_TRIALS = 16
SWEEP_FILE = "sweep.json"  # in the run workspace: the trials and their overrides, the register mode
TABLE_ARTIFACT = "sweep/trials.json"  # in the parent MLflow run: the sweep's table and its winner
REGISTER_MODES = ("best", "all")

# MLflow tags of the sweep's runs and versions.
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows children under their parent
TAG_TRIAL = "loraflow.sweep.trial"  # on a trial's run and version: its number
TAG_OVERRIDES = "loraflow.sweep.overrides"  # on a trial's run and version: JSON of its overrides
TAG_TRIALS = "loraflow.sweep.trials"  # on the parent run: how many trials
TAG_WINNER = "loraflow.sweep.winner"  # on the parent run: the winning trial's number

# Trainer settings a trial may not change, and why: the data is checked and preprocessed once for every trial,
# and every trial takes the same GPUs and pool slots.
NOT_SWEEPABLE = {
    "base_model": "every trial is compared with the champion on one base model",
    "data_format": "the data is checked and preprocessed once, for every trial",
    "max_seq_length": "the data check measures every example against it once, for every trial",
    "distributed": "every trial takes the run's GPUs and pool slots",
    "num_processes": "every trial takes the run's GPUs and pool slots",
}


def sweepable() -> tuple[str, ...]:
    """The names a sweep may vary: the form's trainer settings (job spec fields), in form order."""
    return tuple(
        name
        for names in params.FORM.values()
        for name in names
        if name in spec.SECTION_OF and name not in NOT_SWEEPABLE
    )


_EXAMPLE = '{"lora_r": [4, 8]} (a grid) or [{"lora_r": 4}, {"lora_r": 8, "learning_rate": 0.0003}] (a list)'


def _check_names(names, where: str) -> None:
    allowed = sweepable()
    for name in names:
        if name in allowed:
            continue
        if name in NOT_SWEEPABLE:
            why = f"{name} cannot vary across trials: {NOT_SWEEPABLE[name]}; set it outside the sweep"
        elif name in params.form_names():
            why = f"{name} is a pipeline setting, the same for every trial; set it in the conf outside the sweep"
        else:
            why = f"{name!r} is not a trainer setting of the form; sweep one of {', '.join(allowed)}"
        raise ParamsError(f"sweep {where}: {why}")


def trials(value: Any) -> list[dict[str, Any]]:
    """The sweep param as a list of override objects, one per trial; ParamsError names the key and the fix."""
    if isinstance(value, dict):
        if not value:
            raise ParamsError(f"sweep is an empty object: name at least one setting and its values, e.g. {_EXAMPLE}")
        _check_names(value, "key")
        for name, values in value.items():
            if not isinstance(values, list):
                raise ParamsError(
                    f"sweep key {name} must map to a list of values, not {json.dumps(values)}; "
                    f'write "{name}": [{json.dumps(values)}] for one value'
                )
            if not values:
                raise ParamsError(
                    f'sweep key {name} has an empty list: give it at least one value, e.g. "{name}": [...], '
                    "or drop the key"
                )
        count = math.prod(len(v) for v in value.values())
        if count > MAX_TRIALS:
            sizes = " x ".join(str(len(v)) for v in value.values())
            raise ParamsError(
                f"the sweep's grid has {count} trials ({sizes}), more than the limit of {MAX_TRIALS}; "
                "drop values, or split it into several sweeps"
            )
        return [dict(zip(value, combo, strict=True)) for combo in itertools.product(*value.values())]
    if isinstance(value, list):
        if not value:
            raise ParamsError(f"sweep is an empty list: give at least one trial, e.g. {_EXAMPLE}")
        if len(value) > MAX_TRIALS:
            raise ParamsError(
                f"the sweep lists {len(value)} trials, more than the limit of {MAX_TRIALS}; "
                "drop trials, or split it into several sweeps"
            )
        for i, overrides in enumerate(value):
            if not isinstance(overrides, dict):
                raise ParamsError(
                    f"sweep trial {i} is {json.dumps(overrides)}, not an object of setting overrides; e.g. {_EXAMPLE}"
                )
            _check_names(overrides, f"trial {i}")
        return [dict(o) for o in value]
    raise ParamsError(
        f"sweep must be an object of settings to lists of values or a list of override objects, not "
        f"{json.dumps(value)}; e.g. {_EXAMPLE}"
    )


def prepare(conf: dict[str, Any], dag_id: str, run_id: str, run_type: str, raw_keys=None) -> Pipeline:
    """Validate the run and every trial, then write the run workspace, each trial's and ``sweep.json``.

    Nothing is written unless every trial is valid: a bad trial fails prepare, naming the
    trial, its overrides and the setting at fault, before any data is read.
    """
    conf = dict(conf)
    value = conf.pop("sweep", None)
    mode = conf.pop("sweep_register", "best")
    raw = [k for k in raw_keys or () if k not in params.SWEEP_PARAM_NAMES]
    if mode not in REGISTER_MODES:
        raise ParamsError(f"sweep_register {mode!r} is not best or all; best registers only the winning trial")
    overrides = trials(value)
    run, run_job = workspace.build(conf, dag_id, run_id, run_type, raw)
    built = []
    seen: dict[str, int] = {}
    for i, over in enumerate(overrides):
        try:
            trial, job = workspace.build({**conf, **over}, dag_id, run_id, run_type, trial=i)
        except ParamsError as exc:
            raise ParamsError(f"sweep trial {i} ({_text(over)}): {exc}") from None
        same = seen.setdefault(job.spec_hash(), i)
        if same != i:
            raise ParamsError(
                f"sweep trials {same} ({_text(overrides[same])}) and {i} ({_text(over)}) train the same settings; "
                "drop one of them"
            )
        built.append((trial, job))
    workspace.write(run, run_job)
    for trial, job in built:
        workspace.write(trial, job)
    contract.atomic_write_json(
        Path(run.workspace) / SWEEP_FILE,
        {"register": mode, "trials": [{"trial": i, "overrides": o} for i, o in enumerate(overrides)]},
    )
    return run


def _text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "the form's settings"


def load(ws: str | Path) -> dict[str, Any] | None:
    """The run's ``sweep.json`` (None for a run that is not a sweep)."""
    path = Path(ws) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else None


def trial_workspaces(ws: str | Path) -> list[Path]:
    plan = load(ws) or {"trials": []}
    return [Path(ws) / workspace.trial_name(t["trial"]) for t in plan["trials"]]


DATA_FILES = (contract.TRAIN_FILE, contract.EVAL_FILE, contract.DATASET_SCHEMA_FILE, contract.DATA_REPORT_FILE)


def materialise(ws: str | Path) -> list[str]:
    """Give every trial the run's checked, preprocessed data; return the trial workspaces (the mapped tasks' input).

    The files are hard links where the filesystem allows (copies otherwise). Each trial's
    fingerprint is that of the data and its own settings: sha256 of the run's data
    fingerprint and the trial's spec hash, so the same data and trial settings always give
    the same fingerprint.
    """
    import hashlib

    ws = Path(ws)
    record = json.loads((ws / contract.FINGERPRINT_FILE).read_text())
    out = []
    for tws in trial_workspaces(ws):
        for rel in DATA_FILES:
            src, dst = ws / rel, tws / rel
            if not src.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, dst)
        job = workspace.load_job(tws)
        batch = job.training.per_device_train_batch_size
        if record["train_rows"] < batch:
            raise ParamsError(
                f"sweep {tws.name}: the train split has {record['train_rows']} row(s), fewer than one batch "
                f"(per_device_train_batch_size={batch}); lower that trial's per_device_train_batch_size or add rows"
            )
        fingerprint = hashlib.sha256(f"{record['fingerprint']}\n{job.spec_hash()}".encode()).hexdigest()
        contract.atomic_write_json(
            tws / contract.FINGERPRINT_FILE, {**record, "fingerprint": fingerprint, "spec_hash": job.spec_hash()}
        )
        job.model_copy(update={"data_fingerprint": fingerprint}).write(tws / contract.JOB_FILE)
        out.append(str(tws))
    return out


# -- choosing the winner -----------------------------------------------------------------


@dataclass
class TrialResult:
    trial: int
    overrides: dict[str, Any]
    workspace: Path
    eval_loss: float | None = None  # the challenger's mean loss on the shared eval set (None: no result)
    decision: Any = None  # the gate's loraflow.gate.Decision against the champion
    status: str = "no result"  # evaluated | no result
    extra: dict[str, Any] = field(default_factory=dict)  # what register added: run id, version

    @property
    def finished(self) -> bool:
        return self.eval_loss is not None and self.decision is not None


def results(ws: str | Path) -> list[TrialResult]:
    """Every trial with its eval loss and the gate's decision (a trial without eval.json has neither)."""
    from loraflow import gate

    out = []
    for t in (load(ws) or {"trials": []})["trials"]:
        tws = Path(ws) / workspace.trial_name(t["trial"])
        r = TrialResult(t["trial"], t["overrides"], tws)
        evaluation = tws / contract.OUTPUT_DIR / contract.EVAL_RESULT_FILE
        if evaluation.exists() and (tws / contract.OUTPUT_DIR / contract.SUCCESS).exists():
            pipeline, job = Pipeline.load(tws), workspace.load_job(tws)
            r.eval_loss = float(json.loads(evaluation.read_text())["models"]["challenger"]["eval_loss"])
            r.decision = gate.from_workspace(
                tws,
                margin=pipeline.gate_margin,
                max_epsilon=pipeline.max_epsilon,
                dp_enabled=job.privacy.dp_enabled,
                allow_behaviour_regressions=pipeline.allow_behaviour_regressions,
            )
            r.status = "evaluated"
        out.append(r)
    return out


def rank(results: list[TrialResult]) -> list[TrialResult]:
    """Finished trials, best first: promoted by the gate before kept, then by eval loss, then trial number."""
    return sorted((r for r in results if r.finished), key=lambda r: (not r.decision.promote, r.eval_loss, r.trial))


def table(results: list[TrialResult], winner: int | None, metric: str = "eval_loss") -> dict[str, Any]:
    """The sweep's table (the parent run's artifact and the UI page's): one row per trial."""
    return {
        "metric": metric,
        "winner": winner,
        "trials": [
            {
                "trial": r.trial,
                "overrides": r.overrides,
                metric: r.eval_loss,
                "status": r.status,
                "gate": None if r.decision is None else ("promote" if r.decision.promote else "keep"),
                "gate_reason": None if r.decision is None else r.decision.reason,
                "winner": r.trial == winner,
                **r.extra,
            }
            for r in results
        ],
    }
