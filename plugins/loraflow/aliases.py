"""Alias history and rollback: every move of an alias is recorded, and champion can be moved back.

A move is a registered-model tag ``loraflow.alias_move.<UTC time>-<nonce>`` whose value is
JSON: ``alias``, ``from`` (the version it left, or null), ``to``, ``by`` (who or what moved
it: an Airflow run's register task, a person through the CLI or the UI), ``kind``
(register, promote, rollback), ``reason`` and ``at``. Tag keys sort by time, so the tags
alone are the log; nothing else has to be kept in step with them.

``rollback`` moves ``champion`` to the version that held it before the current one,
skipping versions already rolled back from, and tags the version it leaves with
``loraflow.rolled_back`` (when, by whom, why): register never promotes such a version
again on its own (a re-run of its register task must not undo the rollback); a person
can, with ``loraflow models promote``.

Every move goes through ``move`` (the pipeline's register, the CLI's promote and rollback).
"""

from __future__ import annotations

import getpass
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from loraflow.errors import LoraflowError, RegistryError

MOVE_PREFIX = "loraflow.alias_move."
ROLLED_BACK = "loraflow.rolled_back"  # version tag: champion was rolled back from this version
MAX_REASON = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def record(mc, name: str, alias: str, previous: str | None, version: str, *, by: str, kind: str, reason: str) -> dict[str, Any]:
    """Write one move to the registered model's log (before the move itself, so no move goes unrecorded)."""
    now = _now()
    entry = {"alias": alias, "from": previous, "to": str(version), "by": by[:200], "kind": kind,
             "reason": (reason or "")[:MAX_REASON], "at": now.isoformat(timespec="microseconds")}
    mc.set_registered_model_tag(name, f"{MOVE_PREFIX}{now:%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}", json.dumps(entry))
    return entry


def _current(mc, name: str, alias: str) -> str | None:
    return (mc.get_registered_model(name).aliases or {}).get(alias)


def move(mc, name: str, alias: str, version: str, *, by: str, kind: str, reason: str) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` and log the move; None (nothing logged) when it is already there."""
    previous = _current(mc, name, alias)
    if previous is not None and str(previous) == str(version):
        return None
    entry = record(mc, name, alias, str(previous) if previous is not None else None, str(version), by=by, kind=kind, reason=reason)
    mc.set_registered_model_alias(name, alias, str(version))
    return entry


def moves(mc, name: str) -> list[dict[str, Any]]:
    """The recorded moves of ``name``'s aliases, oldest first."""
    tags = mc.get_registered_model(name).tags or {}
    out = []
    for key in sorted(k for k in tags if k.startswith(MOVE_PREFIX)):
        try:
            out.append(json.loads(tags[key]))
        except ValueError:  # a hand-edited tag: shown, not trusted
            out.append({"alias": "?", "from": None, "to": "?", "by": "?", "kind": "unreadable", "reason": tags[key][:200], "at": key[len(MOVE_PREFIX):]})
    return out


def previous_holder(log: list[dict[str, Any]], alias: str, current: str | None, exists=lambda v: True) -> str | None:
    """The version that held ``alias`` before ``current``, skipping versions rolled back from (and deleted ones)."""
    mine = [m for m in log if m.get("alias") == alias]
    rolled_back = {m.get("from") for m in mine if m.get("kind") == "rollback"}
    holders = [mine[0]["from"]] if mine and mine[0].get("from") else []
    holders += [m["to"] for m in mine]
    for v in reversed(holders):
        if v and v != current and v not in rolled_back and exists(v):
            return v
    return None


# -- what the CLI calls ------------------------------------------------------------------


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def history(uri: str, name: str) -> dict[str, Any]:
    """The alias moves of ``name`` and where each alias points now."""
    from loraflow import lookup, registry

    mc = registry.client(uri)
    with lookup.talking_to(uri):
        model = _model(mc, name)
        log = moves(mc, name)
    return {"name": name, "aliases": dict(model.aliases or {}), "moves": log}


def rollback(uri: str, name: str, reason: str, *, alias: str = "champion", by: str | None = None) -> dict[str, Any]:
    """Move ``alias`` back to the version that held it before the current one; record who and why."""
    from mlflow.exceptions import MlflowException

    from loraflow import lookup, registry

    if not reason or not reason.strip():
        raise LoraflowError("a rollback needs a reason; pass --reason \"why the current version is withdrawn\"")
    mc = registry.client(uri)
    with lookup.talking_to(uri):
        model = _model(mc, name)
        current = (model.aliases or {}).get(alias)
        if current is None:
            raise RegistryError(f"{name} has no {alias} alias to roll back; point one with `loraflow models promote`")
        log = moves(mc, name)

        def exists(v: str) -> bool:
            try:
                mc.get_model_version(name, v)
                return True
            except MlflowException:
                return False

        target = previous_holder(log, alias, str(current), exists)
        if target is None:
            raise RegistryError(f"no earlier {alias} of {name} is recorded to roll back to (it is on v{current}; "
                                f"{len([m for m in log if m.get('alias') == alias])} recorded moves); "
                                f"point it at a version by hand with `loraflow models promote {name} VERSION --reason ...`")
        by = by or who()
        entry = move(mc, name, alias, target, by=by, kind="rollback", reason=reason.strip())
        mc.set_model_version_tag(name, str(current), ROLLED_BACK, json.dumps(
            {"alias": alias, "to": target, "by": by, "reason": reason.strip()[:MAX_REASON], "at": entry["at"] if entry else _now().isoformat()}))
    return {"name": name, "alias": alias, "from": str(current), "to": target, "by": by, "reason": reason.strip()}


def _model(mc, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            from loraflow.lookup import NotFound

            raise NotFound(f"no registered model named {name!r}; `loraflow models list` shows the ones there are") from None
        raise
