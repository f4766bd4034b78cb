"""Read side of the MLflow registry: find, describe, pull and promote loraflow model versions.

Writes made by the pipeline (runs, versions, automatic alias moves) live in ``registry``;
this module reads, except ``promote``, which moves an alias on a person's say-so and
records why. Every function takes the tracking URI and returns plain dicts, so the CLI,
the Airflow UI page and the tests share one view of a version.

Aliases are read from ``get_registered_model(name).aliases``: the SQL store returns none
from ``search_model_versions``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraflow import config, registry
from loraflow.errors import LoraflowError, RegistryError, RegistryUnavailable

LINEAGE_TAGS = {
    "dag_id": registry.DAG_ID,
    "run_id": registry.RUN_ID,
    "run_key": registry.RUN_KEY,
    "data_fingerprint": registry.FINGERPRINT,
    "base_model": registry.BASE_MODEL,
    "spec_hash": registry.SPEC_HASH,
    "image": registry.IMAGE,
    "image_digest": registry.IMAGE_DIGEST,
    "runtime": registry.RUNTIME,
    "gate_metric": registry.GATE_METRIC,
    "base_ref": registry.BASE_REF,
    "base_sha256": registry.BASE_SHA256,
    "loraflow_version": registry.LORAFLOW_VERSION,
    "trainer_version": registry.TRAINER_VERSION,
    "git_commit": registry.GIT_COMMIT,
    "trainer_git_commit": registry.TRAINER_GIT_COMMIT,
}
PROMOTED_BY = "loraflow.promoted_by"
PROMOTED_AT = "loraflow.promoted_at"
PROMOTED_ALIAS = "loraflow.promoted_alias"
# What `pull` copies from the version's MLflow run (artifact path -> optional?).
PULL_ARTIFACTS = {"model": False, "data/dataset_schema.json": True, "metrics.json": False,
                  "metadata.json": False, "samples.jsonl": True, "data/data_report.json": True}
_REF = re.compile(r"^(?P<name>.+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


class NotFound(RegistryError):
    """The name, alias or version asked for is not in the registry."""


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
            raise LoraflowError(f"{text!r} is not a model reference; write NAME@ALIAS (e.g. my-model@champion) or NAME/VERSION (e.g. my-model/3)")
        return cls(m["name"], m["alias"], m["version"])

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


def cli_http_defaults() -> None:
    """A person at a terminal wants a quick "server down", not minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def ui_url(uri: str) -> str:
    """The MLflow UI as a browser reaches it (differs from the tracking URI inside docker-compose)."""
    return os.environ.get("LORAFLOW_MLFLOW_UI_URL", uri).rstrip("/")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


@contextlib.contextmanager
def talking_to(uri: str) -> Iterator[None]:
    """``registry.reachable`` with a message for people: the CLI and the page do not retry."""
    try:
        with registry.reachable(uri):
            yield
    except RegistryUnavailable:
        raise RegistryUnavailable(f"cannot reach the MLflow tracking server at {uri}; start it or set MLFLOW_TRACKING_URI to the right server") from None


def _all_pages(search, **kwargs) -> list:
    """Every result of an MLflow search call, following its page tokens."""
    out, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _missing(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower()


# -- reading -----------------------------------------------------------------------------


def _registered(mc, uri: str, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            raise NotFound(f"no registered model named {name!r} in {uri}; `loraflow models list` shows the names") from None
        raise


def _describe(mc, uri: str, mv, aliases_of: dict[str, list[str]]) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    run = None
    if mv.run_id:
        with contextlib.suppress(MlflowException):  # a version whose run was deleted still lists
            run = mc.get_run(mv.run_id)
    tags = dict(mv.tags or {})
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(aliases_of.get(str(mv.version), [])),
        "status": str(mv.status),
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds") if mv.creation_timestamp else None,
        "lineage": {key: tags.get(tag, "") for key, tag in LINEAGE_TAGS.items()},
        "promotion_reason": tags.get(registry.PROMOTION_REASON),
        "metrics": dict(sorted(run.data.metrics.items())) if run else {},
        "mlflow_run_id": mv.run_id,
        "experiment_id": run.info.experiment_id if run else None,
        "run_url": run_url(uri, run.info.experiment_id, mv.run_id) if run else None,
        "source": mv.source,
        "tags": tags,
    }


def _aliases_by_version(rm) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def list_models(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Registered models (all, or ``name``) with every version, newest first."""
    mc = registry.client(uri)
    with talking_to(uri):
        models = [_registered(mc, uri, name)] if name else sorted(_all_pages(mc.search_registered_models), key=lambda m: m.name)
        out = []
        for rm in models:
            aliases = _aliases_by_version(rm)
            versions = sorted(_versions(mc, rm.name), key=lambda v: -int(v.version))
            out.append({
                "name": rm.name,
                "description": rm.description or "",
                "aliases": dict(sorted((rm.aliases or {}).items())),
                "versions": [_describe(mc, uri, mv, aliases) for mv in versions],
            })
        return out


def show(uri: str, ref: Ref | str) -> dict[str, Any]:
    """One version, by alias, number, or (bare name) the newest."""
    from mlflow.exceptions import MlflowException

    ref = Ref.parse(ref) if isinstance(ref, str) else ref
    mc = registry.client(uri)
    with talking_to(uri):
        rm = _registered(mc, uri, ref.name)
        aliases = _aliases_by_version(rm)
        if ref.alias:
            if ref.alias not in (rm.aliases or {}):
                have = ", ".join(sorted(rm.aliases or {})) or "none"
                raise NotFound(f"model {ref.name!r} has no alias {ref.alias!r} (aliases: {have}); use one of those or NAME/VERSION")
            mv = mc.get_model_version(ref.name, str(rm.aliases[ref.alias]))
        elif ref.version:
            try:
                mv = mc.get_model_version(ref.name, ref.version)
            except MlflowException as exc:
                if not _missing(exc):
                    raise
                have = ", ".join(v.version for v in _versions(mc, ref.name)) or "none"
                raise NotFound(f"model {ref.name!r} has no version {ref.version} (versions: {have}); `loraflow models list --name {ref.name}` shows them") from None
        else:
            found = _versions(mc, ref.name)
            if not found:
                raise NotFound(f"model {ref.name!r} has no versions yet; run the loraflow_finetune DAG to register one")
            mv = found[-1]
        return _describe(mc, uri, mv, aliases)


def _versions(mc, name: str):
    return sorted(_all_pages(mc.search_model_versions, filter_string=f"name = '{_quote(name)}'"), key=lambda v: int(v.version))


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def describe_latest(name: str, tracking_uri: str) -> dict[str, Any]:
    """The newest version of ``name`` with its aliases, metrics and lineage."""
    return show(tracking_uri, Ref(name))


def versions_by_run_key(uri: str) -> dict[str, list[dict[str, Any]]]:
    """Every loraflow-registered version, grouped by the DAG run that produced it."""
    mc = registry.client(uri)
    out: dict[str, list[dict[str, Any]]] = {}
    with talking_to(uri):
        for rm in _all_pages(mc.search_registered_models):
            aliases = _aliases_by_version(rm)
            for mv in _versions(mc, rm.name):
                key = (mv.tags or {}).get(registry.RUN_KEY)
                if key:
                    out.setdefault(key, []).append(_describe(mc, uri, mv, aliases))
    return out


def mlflow_run_for(uri: str, run_key: str) -> dict[str, str] | None:
    """The MLflow run a DAG run logged to (found by its run-key tag), or None."""
    mc = registry.client(uri)
    with talking_to(uri):
        exps = [e.experiment_id for e in mc.search_experiments(filter_string="name LIKE 'loraflow/%'")]
        if not exps:
            return None
        runs = mc.search_runs(exps, filter_string=f"tags.`{registry.RUN_KEY}` = '{_quote(run_key)}'", max_results=1)
        if not runs:
            return None
        run = runs[0]
        return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                "url": run_url(uri, run.info.experiment_id, run.info.run_id)}


# -- pulling -----------------------------------------------------------------------------


def pull(uri: str, ref: Ref | str, dest: Path) -> dict[str, Any]:
    """Copy a version's model (adapter + base reference), schema, metrics and metadata to ``dest``."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    info = show(uri, ref)
    if not info["mlflow_run_id"]:
        raise RegistryError(f"{info['name']}/{info['version']} has no MLflow run to pull artifacts from; it was not registered by loraflow")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise LoraflowError(f"{dest} is not empty; pass an empty or new --dest directory")
    dest.mkdir(parents=True, exist_ok=True)
    pulled = []
    with talking_to(uri):
        for path, optional in PULL_ARTIFACTS.items():
            try:
                download_artifacts(run_id=info["mlflow_run_id"], artifact_path=path, dst_path=str(dest), tracking_uri=uri)
            except (MlflowException, OSError) as exc:
                if optional:
                    continue
                shutil.rmtree(dest, ignore_errors=True)
                raise RegistryError(f"artifact {path!r} of MLflow run {info['mlflow_run_id']} could not be downloaded ({str(exc).splitlines()[0][:200]}); check the server's artifact store") from None
            pulled.append(path)
    adapter = dest / "model" / "peft"
    info = {**info, "pulled": pulled, "dest": str(dest.resolve()),
            "adapter_dir": str(adapter.resolve()) if adapter.is_dir() else None,
            "base_model_path": base_model_path(dest / "model"), "base_model_ref": _read_reference(dest / "model")}
    (dest / "version.json").write_text(json.dumps(info, indent=2))
    return info


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
        if (cand / "config.json").is_file():
            return str(cand.resolve())
    wanted = info["lineage"].get("base_model") or "its base model"
    raise LoraflowError(f"the base model of {what} is not at {' or '.join(map(str, looked)) or '(no path recorded)'}; "
                        f"pass --base-model-path DIR pointing at a local copy of {wanted} (a directory with config.json)")


def download_model(uri: str, info: dict[str, Any], dest: Path) -> Path:
    """The version's ``model/`` artifact (adapter + base reference) under ``dest``."""
    from mlflow.artifacts import download_artifacts

    if not info["mlflow_run_id"]:
        raise RegistryError(f"{info['name']}/{info['version']} has no MLflow run to load the model from; it was not registered by loraflow")
    with talking_to(uri):
        return Path(download_artifacts(run_id=info["mlflow_run_id"], artifact_path="model", dst_path=str(dest), tracking_uri=uri))


def _read_reference(model_dir: Path) -> dict[str, Any] | None:
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


# -- promoting ---------------------------------------------------------------------------


def promote(uri: str, name: str, version: str, alias: str, reason: str, by: str | None = None) -> dict[str, Any]:
    """Point ``alias`` at ``name`` version ``version`` and record who did it (``by``, else the OS user) and why."""
    if not reason or not reason.strip():
        raise LoraflowError("a promotion needs a reason; pass --reason \"why this version\"")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", alias) or alias.lower() == "latest":
        raise LoraflowError(f"{alias!r} is not a valid alias; use letters, digits, '-' or '_' (e.g. champion), not 'latest'")
    before = show(uri, Ref(name, version=str(version)))  # raises NotFound with the versions there are
    mc = registry.client(uri)
    with talking_to(uri):
        previous = (mc.get_registered_model(name).aliases or {}).get(alias)
        from loraflow import aliases  # every alias move goes into the model's alias history

        aliases.move(mc, name, alias, str(version), by=by or _who(), kind="promote", reason=reason.strip())
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for key, value in ((registry.PROMOTION_REASON, reason.strip()), (PROMOTED_ALIAS, alias),
                           (PROMOTED_BY, by or _who()), (PROMOTED_AT, now)):
            mc.set_model_version_tag(name, str(version), key, value)
    after = show(uri, Ref(name, version=str(version)))
    return {**after, "alias": alias, "previous_version": str(previous) if previous is not None else None,
            "was_aliases": before["aliases"]}


SOURCE_MODEL = "loraflow.source_model"
SOURCE_VERSION = "loraflow.source_version"
EXPORT_FORMAT = "loraflow.export_format"
MERGED_VERSION = "loraflow.merged_version"
EXPORT_KEY = "loraflow.export_key"  # not the run key: an export is no DAG run, and the UI groups versions by run key


def register_export(uri: str, info: dict[str, Any], out: Path, name: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """Register an exported merged model as a version of ``name``, linked both ways to its adapter version.

    The merged version's source is the HF model directory (``from_pretrained`` loads it once
    downloaded); tags name the adapter version and the base. Registering the same adapter
    version again returns the version registered before.
    """
    from mlflow.exceptions import MlflowException

    mc = registry.client(uri)
    source = f"{info['name']}/{info['version']}"
    base = lineage["base"].get("reference") or {}
    tags = {SOURCE_MODEL: info["name"], SOURCE_VERSION: info["version"], EXPORT_FORMAT: lineage["format"],
            registry.BASE_REF: str(base.get("name") or base.get("id") or ""), registry.BASE_SHA256: str(base.get("sha256") or ""),
            EXPORT_KEY: f"{source}/{lineage['format']}"}
    # MLflow prints run links on stdout; the CLI's stdout is its --json answer.
    with talking_to(uri), contextlib.redirect_stdout(sys.stderr):
        with contextlib.suppress(MlflowException):
            found = registry.find_version(mc, name, EXPORT_KEY, tags[EXPORT_KEY])
            if found:
                return {"name": name, "version": str(found[0].version), "created": False}
        exp = mc.get_experiment_by_name(registry.experiment_name(info["name"]))
        exp_id = exp.experiment_id if exp else mc.create_experiment(registry.experiment_name(info["name"]))
        run = mc.create_run(exp_id, tags={**tags, "mlflow.runName": f"merge {source}"})
        mc.log_artifacts(run.info.run_id, str(out), "merged")
        mc.set_terminated(run.info.run_id, "FINISHED")
        with contextlib.suppress(MlflowException):
            mc.create_registered_model(name, description=f"{info['name']} adapters merged into their base model by loraflow")
        mv = mc.create_model_version(name, f"{run.info.artifact_uri}/merged", run_id=run.info.run_id, tags=tags)
        mc.set_model_version_tag(info["name"], info["version"], MERGED_VERSION, f"{name}/{mv.version}")
    return {"name": name, "version": str(mv.version), "created": True, "mlflow_run_id": run.info.run_id}


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"
