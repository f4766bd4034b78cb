"""Finding and reading model versions: by alias, number or newest; their lineage; their files.

Every reader returns plain dicts (``describe``), so the CLI, the Airflow UI page and the
tests share one view of a version. Aliases are read from ``get_registered_model(name)``
or ``get_model_version_by_alias``: the SQL store returns none from ``search_model_versions``.
These functions serve people (the CLI, the UI page, serving), so an unreachable server is
reported as such, without a retry.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraflow import config
from loraflow.errors import LoraflowError, RegistryError
from loraflow.registry import tags as T
from loraflow.registry.client import (
    NotFound,
    all_pages,
    is_missing,
    mlflow_client,
    reachable,
    run_url,
    search_runs,
    search_versions,
)
from loraflow_trainer import contract

# What ``pull`` copies from the version's MLflow run (artifact path -> optional?).
PULL_ARTIFACTS = {
    T.MODEL_ARTIFACT: False,
    f"{T.DATA_ARTIFACTS}/{Path(contract.DATASET_SCHEMA_FILE).name}": True,
    contract.METRICS_FILE: False,
    contract.METADATA_FILE: False,
    contract.SAMPLES_FILE: True,
    f"{T.DATA_ARTIFACTS}/{contract.DATA_REPORT_FILE}": True,
}
_REF = re.compile(r"^(?P<name>.+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


@dataclass(frozen=True)
class Ref:
    """A model reference as people write it: ``name@alias``, ``name/version`` or ``name`` (newest)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        m = _REF.match(text.strip())
        if not m or not m["name"]:
            raise LoraflowError(
                f"{text!r} is not a model reference; write NAME@ALIAS (e.g. my-model@champion) "
                "or NAME/VERSION (e.g. my-model/3)"
            )
        return cls(m["name"], m["alias"], m["version"])

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


# -- finding -----------------------------------------------------------------------------


def registered_model(mc, uri: str, name: str):
    """The registered model ``name``; NotFound (naming the command that lists them) if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_registered_model(name)
    except MlflowException as exc:
        if is_missing(exc):
            raise NotFound(
                f"no registered model named {name!r} in {uri}; `loraflow models list` shows the names"
            ) from None
        raise


def alias_version(mc, name: str, alias: str):
    """The version ``alias`` points at, or None (no such alias, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise


def _find(mc, uri: str, ref: Ref):
    """The model version ``ref`` names, and the aliases of every version of its model."""
    from mlflow.exceptions import MlflowException

    rm = registered_model(mc, uri, ref.name)
    aliases = _aliases_by_version(rm)
    if ref.alias:
        if ref.alias not in (rm.aliases or {}):
            have = ", ".join(sorted(rm.aliases or {})) or "none"
            raise NotFound(
                f"model {ref.name!r} has no alias {ref.alias!r} (aliases: {have}); use one of those or NAME/VERSION"
            )
        return mc.get_model_version(ref.name, str(rm.aliases[ref.alias])), aliases
    if ref.version:
        try:
            return mc.get_model_version(ref.name, ref.version), aliases
        except MlflowException as exc:
            if not is_missing(exc):
                raise
            have = ", ".join(v.version for v in search_versions(mc, ref.name)) or "none"
            raise NotFound(
                f"model {ref.name!r} has no version {ref.version} (versions: {have}); "
                f"`loraflow models list --name {ref.name}` shows them"
            ) from None
    found = search_versions(mc, ref.name)
    if not found:
        raise NotFound(f"model {ref.name!r} has no versions yet; run the loraflow_finetune DAG to register one")
    return found[-1], aliases


def _aliases_by_version(rm) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


# -- reading -----------------------------------------------------------------------------


def describe(mc, uri: str, mv, aliases_of: dict[str, list[str]]) -> dict[str, Any]:
    """One version as the CLI, the UI page and the tests see it: aliases, lineage, metrics, links."""
    from mlflow.exceptions import MlflowException

    run = None
    if mv.run_id:
        with contextlib.suppress(MlflowException):  # a version whose run was deleted still lists
            run = mc.get_run(mv.run_id)
    tags = dict(mv.tags or {})
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC) if mv.creation_timestamp else None
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(aliases_of.get(str(mv.version), [])),
        "status": str(mv.status),
        "created": created.isoformat(timespec="seconds") if created else None,
        "lineage": {key: tags.get(tag, "") for key, tag in T.LINEAGE_TAGS.items()},
        "promotion_reason": tags.get(T.PROMOTION_REASON),
        "metrics": dict(sorted(run.data.metrics.items())) if run else {},
        "mlflow_run_id": mv.run_id,
        "experiment_id": run.info.experiment_id if run else None,
        "run_url": run_url(uri, run.info.experiment_id, mv.run_id) if run else None,
        "source": mv.source,
        "tags": tags,
    }


def show(uri: str, ref: Ref | str) -> dict[str, Any]:
    """One version, by alias, number, or (bare name) the newest."""
    ref = Ref.parse(ref) if isinstance(ref, str) else ref
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        mv, aliases = _find(mc, uri, ref)
        return describe(mc, uri, mv, aliases)


def list_models(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Registered models (all, or ``name``) with every version, newest first."""
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        if name:
            models = [registered_model(mc, uri, name)]
        else:
            models = sorted(all_pages(mc.search_registered_models), key=lambda m: m.name)
        out = []
        for rm in models:
            aliases = _aliases_by_version(rm)
            out.append(
                {
                    "name": rm.name,
                    "description": rm.description or "",
                    "aliases": dict(sorted((rm.aliases or {}).items())),
                    "versions": [describe(mc, uri, mv, aliases) for mv in reversed(search_versions(mc, rm.name))],
                }
            )
        return out


def versions_by_run_key(uri: str) -> dict[str, list[dict[str, Any]]]:
    """Every loraflow-registered version, grouped by the DAG run that produced it."""
    mc = mlflow_client(uri)
    out: dict[str, list[dict[str, Any]]] = {}
    with reachable(uri, interactive=True):
        for rm in all_pages(mc.search_registered_models):
            aliases = _aliases_by_version(rm)
            for mv in search_versions(mc, rm.name):
                key = (mv.tags or {}).get(T.RUN_KEY)
                if key:
                    out.setdefault(key, []).append(describe(mc, uri, mv, aliases))
    return out


def mlflow_run_for(uri: str, run_key: str) -> dict[str, str] | None:
    """The MLflow run a DAG run logged to (found by its run-key tag), or None."""
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        exps = [e.experiment_id for e in all_pages(mc.search_experiments, filter_string="name LIKE 'loraflow/%'")]
        runs = search_runs(mc, exps, {T.RUN_KEY: run_key}) if exps else []
        if not runs:
            return None
        run = runs[0]
        return {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "url": run_url(uri, run.info.experiment_id, run.info.run_id),
        }


# -- fetching ----------------------------------------------------------------------------


def pull(uri: str, ref: Ref | str, dest: Path) -> dict[str, Any]:
    """Copy a version's model (adapter + base reference), schema, metrics and metadata to ``dest``."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    info = show(uri, ref)
    if not info["mlflow_run_id"]:
        raise RegistryError(
            f"{info['name']}/{info['version']} has no MLflow run to pull artifacts from; "
            "it was not registered by loraflow"
        )
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise LoraflowError(f"{dest} is not empty; pass an empty or new --dest directory")
    dest.mkdir(parents=True, exist_ok=True)
    pulled = []
    with reachable(uri, interactive=True):
        for path, optional in PULL_ARTIFACTS.items():
            try:
                download_artifacts(
                    run_id=info["mlflow_run_id"], artifact_path=path, dst_path=str(dest), tracking_uri=uri
                )
            except (MlflowException, OSError) as exc:
                if optional:
                    continue
                shutil.rmtree(dest, ignore_errors=True)
                raise RegistryError(
                    f"artifact {path!r} of MLflow run {info['mlflow_run_id']} could not be downloaded "
                    f"({str(exc).splitlines()[0][:200]}); check the server's artifact store"
                ) from None
            pulled.append(path)
    model = dest / T.MODEL_ARTIFACT
    adapter = model / "peft"
    info = {
        **info,
        "pulled": pulled,
        "dest": str(dest.resolve()),
        "adapter_dir": str(adapter.resolve()) if adapter.is_dir() else None,
        "base_model_path": base_model_path(model),
        "base_model_ref": read_reference(model),
    }
    contract.atomic_write_json(dest / "version.json", info)
    return info


def download_model(uri: str, info: dict[str, Any], dest: Path) -> Path:
    """The version's ``model/`` artifact (adapter + base reference) under ``dest``."""
    from mlflow.artifacts import download_artifacts

    if not info["mlflow_run_id"]:
        raise RegistryError(
            f"{info['name']}/{info['version']} has no MLflow run to load the model from; "
            "it was not registered by loraflow"
        )
    with reachable(uri, interactive=True):
        return Path(
            download_artifacts(
                run_id=info["mlflow_run_id"], artifact_path=T.MODEL_ARTIFACT, dst_path=str(dest), tracking_uri=uri
            )
        )


def run_params(uri: str, info: dict[str, Any]) -> dict[str, str]:
    """The params logged to the MLflow run of a version (as ``describe`` returned it)."""
    with reachable(uri, interactive=True):
        return dict(mlflow_client(uri).get_run(info["mlflow_run_id"]).data.params)


def resolve_base(model_dir: Path, info: dict[str, Any], given: str | None = None) -> str:
    """The base model of a downloaded version on this host (a directory, or a hub id), verified by its weights hash.

    ``given`` (``--base-model-path``) wins; otherwise ``$LORAFLOW_MODELS/<name>``, then the path
    it was trained at. Versions registered before the base was recorded portably fall back
    to the recorded path and its directory name in the cache, unverified.
    """
    from loraflow_trainer import base_model

    what = f"{info['name']}/{info['version']}"
    ref = base_model.read_reference(model_dir)
    if ref:
        try:
            return base_model.resolve(ref, given, config.models_dir())
        except base_model.BaseModelError as exc:
            raise LoraflowError(f"{what} cannot be loaded here: {exc}") from None
    recorded = base_model_path(model_dir)
    looked = [Path(given)] if given else [Path(recorded), config.models_dir() / Path(recorded).name] if recorded else []
    for cand in looked:
        if contract.is_model_dir(cand):
            return str(cand.resolve())
    wanted = info["lineage"].get("base_model") or "its base model"
    where = " or ".join(map(str, looked)) or "(no path recorded)"
    raise LoraflowError(
        f"the base model of {what} is not at {where}; pass --base-model-path DIR pointing at "
        f"a local copy of {wanted} (a directory with config.json)"
    )


def read_reference(model_dir: Path) -> dict[str, Any] | None:
    """The portable base reference a downloaded ``model/`` records (None for versions saved before it did)."""
    from loraflow_trainer import base_model

    return base_model.read_reference(model_dir)


def base_model_path(model_dir: Path) -> str | None:
    """The local base model an MLflow PEFT model was saved against (from its MLmodel file)."""
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.exists():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("transformers", {})
    return flavor.get("local_base_model_path")
