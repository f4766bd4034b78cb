"""The Airflow side of the evaluate task: its settings, the champion's adapter, the request.

The trainer container has no MLflow access, so before it starts, this module fetches the
current champion's adapter from the registry (the ``model/peft`` artifacts of the
champion version's run) into ``<workspace>/champion/adapter``, copies the behaviour suite
into the workspace, and writes ``evaluate_request.json`` for
``python -m loraflow_trainer.evaluate``. A champion trained on another base model (its
recorded ``base_model_ref`` differs from this run's) is not fetched: the request says
"not comparable", and the gate does not compare it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraflow.errors import ParamsError
from loraflow_trainer import contract

REQUEST = contract.EVAL_REQUEST_FILE
CHAMPION_DIR = "champion"
SUITE_FILE = "behaviour_suite.jsonl"
MAX_GENERATION_EXAMPLES = 64


def settings(values: dict[str, Any]) -> dict[str, Any]:
    """The evaluate/gate params of a trigger, checked, as ``Pipeline`` fields; ParamsError names the fix."""
    from loraflow import config
    from loraflow.workspace import confine
    from loraflow_trainer import behaviour
    from loraflow_trainer.errors import DataError

    out: dict[str, Any] = {}
    suite = values.get("behaviour_suite_path")
    if suite:
        path = confine(str(suite), config.data_roots(), "behaviour_suite_path")
        if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
            raise ParamsError(f"behaviour_suite_path {suite!r} is not a JSONL file; give one case per line as JSON")
        try:
            behaviour.load_suite(path)
        except DataError as exc:
            raise ParamsError(str(exc)) from None
        out["behaviour_suite_path"] = str(path)
    margin = values.get("gate_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin) or margin < 0:
        raise ParamsError(f"gate_margin {margin!r} must be a number of nats, 0 or more")
    out["gate_margin"] = float(margin)
    eps = values.get("max_epsilon")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
            raise ParamsError(f"max_epsilon {eps!r} must be a positive number (or empty for no privacy policy)")
        out["max_epsilon"] = float(eps)
    for flag in ("allow_behaviour_regressions", "evaluate_base"):
        if flag in values:
            if not isinstance(values[flag], bool):
                raise ParamsError(f"{flag} {values[flag]!r} must be true or false")
            out[flag] = values[flag]
    return out


def _base_identity(ref: dict[str, Any] | None) -> tuple | None:
    if not ref:
        return None
    if ref.get("kind") == "hub":
        return ("hub", ref.get("id"), ref.get("revision"))
    return ("cache", ref.get("sha256"))


def fetch_champion(pipeline, log=print) -> dict[str, Any]:
    """Download the current champion's adapter into the workspace; return the request's ``champion`` entry."""
    from loraflow import config, registry, secrets

    ws = Path(pipeline.workspace)
    dest = ws / CHAMPION_DIR
    shutil.rmtree(dest, ignore_errors=True)
    registry.http_defaults()
    secrets.apply_mlflow_credentials()
    uri = config.tracking_uri()
    mc = registry.mlflow_client(uri)
    name = pipeline.registered_model_name
    with registry.reachable(uri):
        mv = registry.alias_version(mc, name, registry.CHAMPION)
        if mv is None:
            return {"status": "none", "version": None, "reason": f"{name} has no champion yet"}
        tags = mv.tags or {}
        if tags.get(registry.RUN_KEY) == pipeline.run_key:
            return {"status": "self", "version": mv.version, "reason": "this run's version is already the champion"}
        if not mv.run_id:
            return {
                "status": "not_comparable",
                "version": mv.version,
                "reason": "the champion has no MLflow run to fetch its adapter from",
            }
        mine = json.loads((ws / contract.OUTPUT_DIR / contract.METADATA_FILE).read_text()).get("base_model_ref")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                downloaded = Path(mc.download_artifacts(mv.run_id, contract.METADATA_FILE, tmp))
                theirs = json.loads(downloaded.read_text()).get("base_model_ref")
            except (OSError, ValueError):
                theirs = None
        if _base_identity(mine) is None or _base_identity(mine) != _base_identity(theirs):
            from loraflow_trainer import base_model

            what = (
                base_model.describe(theirs)
                if theirs
                else f"base {tags.get(registry.BASE_MODEL, 'unknown')} (no weights hash recorded)"
            )
            return {
                "status": "not_comparable",
                "version": mv.version,
                "reason": f"v{mv.version} was trained on {what}, "
                f"this run on {base_model.describe(mine) if mine else 'an unrecorded base'}",
            }
        staging = ws / f".{CHAMPION_DIR}-download"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            local = Path(mc.download_artifacts(mv.run_id, "model/peft", str(staging)))
        except Exception as exc:  # an MlflowException or an OSError from the artifact store
            shutil.rmtree(staging, ignore_errors=True)
            return {
                "status": "not_comparable",
                "version": mv.version,
                "reason": f"its adapter (model/peft of run {mv.run_id}) could not be downloaded: "
                f"{str(exc).splitlines()[0][:200]}",
            }
        dest.mkdir()
        local.replace(dest / "adapter")
        shutil.rmtree(staging, ignore_errors=True)
    log(f"loraflow: evaluate compares with the champion, {name} v{mv.version} (adapter in {dest / 'adapter'})")
    return {
        "status": "compared",
        "version": mv.version,
        "reason": f"champion {name} v{mv.version}",
        "run_id": mv.run_id,
    }


def write_request(pipeline, log=print) -> dict[str, Any]:
    """Fetch the champion, copy the suite, write evaluate_request.json; return the request."""
    from loraflow_trainer import behaviour
    from loraflow_trainer.errors import DataError

    ws = Path(pipeline.workspace)
    champion = fetch_champion(pipeline, log)
    adapters = {"challenger": "output/adapter"}
    if champion["status"] == "compared":
        adapters["champion"] = f"{CHAMPION_DIR}/adapter"
    suite = None
    if pipeline.behaviour_suite_path:
        try:
            behaviour.load_suite(Path(pipeline.behaviour_suite_path))  # it may have changed since the trigger
        except DataError as exc:
            raise ParamsError(str(exc)) from None
        shutil.copyfile(pipeline.behaviour_suite_path, ws / SUITE_FILE)
        suite = SUITE_FILE
    request = {
        "adapters": adapters,
        "champion": champion,
        "include_base": bool(pipeline.evaluate_base),
        "behaviour_suite": suite,
        "max_generation_examples": MAX_GENERATION_EXAMPLES,
        "output": f"{contract.OUTPUT_DIR}/{contract.EVAL_RESULT_FILE}",
    }
    contract.atomic_write_json(ws / REQUEST, request)
    if champion["status"] != "compared":
        log(f"loraflow: evaluate scores this run's adapter only: {champion['reason']}")
    return request


def summary(ws: Path) -> dict[str, Any]:
    """What the evaluate task returns (XCom): each model's eval loss and behaviour passes, the champion compared."""
    ev = json.loads((Path(ws) / "output" / "eval.json").read_text())
    return {
        "champion": ev.get("champion"),
        "n_examples": ev.get("n_examples"),
        "runtime_s": ev.get("runtime_s"),
        "models": {
            k: {
                "eval_loss": m["eval_loss"],
                "behaviour_passed": sum(c["passed"] for c in m["behaviour"]),
                **m.get("generation", {}),
            }
            for k, m in ev.get("models", {}).items()
        },
    }
