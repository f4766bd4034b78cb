"""Read side of the MLflow registry: find, describe and pull loraflow model versions.

Writes (runs, versions, aliases) live in ``registry``; this module only reads, except
``promote``, which moves an alias on a person's say-so and records why.
"""

from __future__ import annotations

from typing import Any

from loraflow import registry
from loraflow.errors import RegistryError


def describe_version(mc, name: str, version: str, uri: str) -> dict[str, Any]:
    mv = mc.get_model_version(name, version)
    run = mc.get_run(mv.run_id) if mv.run_id else None
    return {
        "name": name,
        "version": mv.version,
        "aliases": sorted(mv.aliases),
        "tags": dict(mv.tags or {}),
        "metrics": dict(run.data.metrics) if run else {},
        "run_id": mv.run_id,
        "run_url": f"{uri}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}" if run else None,
        "source": mv.source,
    }


def describe_latest(name: str, tracking_uri: str) -> dict[str, Any]:
    """The newest version of ``name`` with its aliases, metrics and lineage."""
    mc = registry.client(tracking_uri)
    with registry.reachable(tracking_uri):
        versions = mc.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RegistryError(f"registered model {name!r} has no versions in {tracking_uri}; run the loraflow_finetune DAG first")
        latest = max(versions, key=lambda v: int(v.version))
        return describe_version(mc, name, latest.version, tracking_uri)
