"""Every alias move, and its history: register's forward-only moves, promote, rollback.

A move is a registered-model tag ``loraflow.alias_move.<UTC time>-<nonce>`` whose value is
JSON: ``alias``, ``from`` (the version it left, or null), ``to``, ``by`` (who or what moved
it: an Airflow run's register task, a person through the CLI or the UI), ``kind``
(register, promote, rollback), ``reason`` and ``at``. Tag keys sort by time, so the tags
alone are the log; nothing else has to be kept in step with them. Every move goes through
``move``.

``advance`` is what register does: ``challenger`` to the new version, ``champion`` too if
it wins, and neither ever back to an older version. ``rollback`` moves ``champion`` to
the version that held it before the current one, skipping versions already rolled back
from, and tags the version it leaves with ``loraflow.rolled_back`` (when, by whom, why):
register never promotes such a version again on its own (a re-run of its register task
must not undo the rollback); a person can, with ``loraflow models promote``.
"""

from __future__ import annotations

import getpass
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from loraflow.errors import LoraflowError, RegistryError
from loraflow.registry import tags as T
from loraflow.registry.client import is_missing, mlflow_client, reachable
from loraflow.registry.versions import Ref, alias_version, registered_model, show

MOVE_PREFIX = "loraflow.alias_move."
ROLLED_BACK = "loraflow.rolled_back"  # version tag: champion was rolled back from this version
MAX_REASON = 1000
LOWER_IS_BETTER = ("loss", "perplexity")


def _now() -> datetime:
    return datetime.now(UTC)


def who() -> str:
    """The OS user moving an alias by hand."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


# -- the log -----------------------------------------------------------------------------


def record(
    mc, name: str, alias: str, previous: str | None, version: str, *, by: str, kind: str, reason: str
) -> dict[str, Any]:
    """Write one move to the registered model's log (before the move itself, so no move goes unrecorded)."""
    now = _now()
    entry = {
        "alias": alias,
        "from": previous,
        "to": str(version),
        "by": by[:200],
        "kind": kind,
        "reason": (reason or "")[:MAX_REASON],
        "at": now.isoformat(timespec="microseconds"),
    }
    mc.set_registered_model_tag(name, f"{MOVE_PREFIX}{now:%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}", json.dumps(entry))
    return entry


def move(mc, name: str, alias: str, version: str, *, by: str, kind: str, reason: str) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` and log the move; None (nothing logged) when it is already there."""
    previous = (mc.get_registered_model(name).aliases or {}).get(alias)
    if previous is not None and str(previous) == str(version):
        return None
    previous = str(previous) if previous is not None else None
    entry = record(mc, name, alias, previous, str(version), by=by, kind=kind, reason=reason)
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
            out.append(
                {
                    "alias": "?",
                    "from": None,
                    "to": "?",
                    "by": "?",
                    "kind": "unreadable",
                    "reason": tags[key][:200],
                    "at": key[len(MOVE_PREFIX) :],
                }
            )
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


# -- by hand: the CLI and the UI page ----------------------------------------------------


def history(uri: str, name: str) -> dict[str, Any]:
    """The alias moves of ``name`` and where each alias points now."""
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        model = registered_model(mc, uri, name)
        log = moves(mc, name)
    return {"name": name, "aliases": dict(model.aliases or {}), "moves": log}


def promote(uri: str, name: str, version: str, alias: str, reason: str, by: str | None = None) -> dict[str, Any]:
    """Point ``alias`` at ``name`` version ``version`` and record who did it (``by``, else the OS user) and why."""
    if not reason or not reason.strip():
        raise LoraflowError('a promotion needs a reason; pass --reason "why this version"')
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", alias) or alias.lower() == "latest":
        raise LoraflowError(
            f"{alias!r} is not a valid alias; use letters, digits, '-' or '_' (e.g. champion), not 'latest'"
        )
    before = show(uri, Ref(name, version=str(version)))  # raises NotFound with the versions there are
    by, reason = by or who(), reason.strip()
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        previous = (mc.get_registered_model(name).aliases or {}).get(alias)
        move(mc, name, alias, str(version), by=by, kind="promote", reason=reason)
        now = _now().isoformat(timespec="seconds")
        record_tags = {T.PROMOTION_REASON: reason, T.PROMOTED_ALIAS: alias, T.PROMOTED_BY: by, T.PROMOTED_AT: now}
        for key, value in record_tags.items():
            mc.set_model_version_tag(name, str(version), key, value)
    after = show(uri, Ref(name, version=str(version)))
    return {
        **after,
        "alias": alias,
        "previous_version": str(previous) if previous is not None else None,
        "was_aliases": before["aliases"],
    }


def rollback(uri: str, name: str, reason: str, *, alias: str = T.CHAMPION, by: str | None = None) -> dict[str, Any]:
    """Move ``alias`` back to the version that held it before the current one; record who and why."""
    from mlflow.exceptions import MlflowException

    if not reason or not reason.strip():
        raise LoraflowError('a rollback needs a reason; pass --reason "why the current version is withdrawn"')
    mc = mlflow_client(uri)
    with reachable(uri, interactive=True):
        model = registered_model(mc, uri, name)
        current = (model.aliases or {}).get(alias)
        if current is None:
            raise RegistryError(f"{name} has no {alias} alias to roll back; point one with `loraflow models promote`")
        log = moves(mc, name)

        def exists(v: str) -> bool:
            try:
                mc.get_model_version(name, v)
                return True
            except MlflowException as exc:
                if is_missing(exc):
                    return False
                raise

        target = previous_holder(log, alias, str(current), exists)
        if target is None:
            raise RegistryError(
                f"no earlier {alias} of {name} is recorded to roll back to (it is on v{current}; "
                f"{len([m for m in log if m.get('alias') == alias])} recorded moves); "
                f"point it at a version by hand with "
                f"`loraflow models promote {name} VERSION --reason ...`"
            )
        by = by or who()
        entry = move(mc, name, alias, target, by=by, kind="rollback", reason=reason.strip())
        withdrawn = {
            "alias": alias,
            "to": target,
            "by": by,
            "reason": reason.strip()[:MAX_REASON],
            "at": entry["at"] if entry else _now().isoformat(),
        }
        mc.set_model_version_tag(name, str(current), ROLLED_BACK, json.dumps(withdrawn))
    return {"name": name, "alias": alias, "from": str(current), "to": target, "by": by, "reason": reason.strip()}


# -- by the pipeline: register's moves, forward only -------------------------------------


def advance(
    mc, name: str, version: str, gate_metric: str, value: Any, gate: Any = None
) -> tuple[str | None, list[str]]:
    """challenger -> this version, champion -> this version if it beats the champion; forward only.

    Neither alias moves to a version older than the one it is on (``_is_older``): clearing
    and re-running register of an old run leaves both where they are. Each alias left in
    place gets its reason in the version's ``loraflow.alias_note`` tag. With a ``gate``
    decision (``loraflow.gate.Decision``) the champion moves only if the gate promotes
    against the champion it was evaluated with; without one, by the recorded ``gate_metric``
    (``value`` is this version's). A version champion was rolled back from is never
    promoted again here. Every move is logged (``move``). Returns (champion, notes).
    """
    mine = mc.get_model_version(name, version)
    by = f"register of {(mine.tags or {}).get(T.RUN_KEY, 'v' + str(version))}"

    def set_alias(alias: str, reason: str) -> None:
        move(mc, name, alias, version, by=by, kind="register", reason=reason)

    def promote_here(reason: str) -> None:
        set_alias(T.CHAMPION, reason)
        mc.set_model_version_tag(name, version, T.PROMOTION_REASON, reason[:4900])

    notes: list[str] = []
    challenger = alias_version(mc, name, T.CHALLENGER)
    if challenger is None or not _is_older(mine, challenger):
        if challenger is None or challenger.version != version:
            set_alias(T.CHALLENGER, "newest registered version")
    else:
        notes.append(f"challenger stays on v{challenger.version}: {_why_older(mine, challenger)}")
    champion_mv = alias_version(mc, name, T.CHAMPION)
    champion = champion_mv.version if champion_mv else None
    rolled_back = (mine.tags or {}).get(ROLLED_BACK)
    if champion_mv is None:
        if gate is not None and not gate.promote:
            notes.append(f"no champion set: {gate.reason}")
        elif challenger is None or not _is_older(mine, challenger):
            promote_here(gate.reason if gate is not None else "first version")
            champion = version
        else:
            notes.append(f"no champion set: v{version} is older than the challenger v{challenger.version}")
    elif champion_mv.version != version:
        theirs = _gate_value(mc, champion_mv, gate_metric)
        if _is_older(mine, champion_mv):
            notes.append(f"champion stays on v{champion_mv.version}: {_why_older(mine, champion_mv)}")
        elif rolled_back:
            notes.append(
                f"champion stays on v{champion_mv.version}: champion was rolled back from v{version} ({rolled_back})"
            )
        elif gate is not None:
            if gate.champion_version != champion_mv.version:
                compared = "v" + gate.champion_version if gate.champion_version else "no champion"
                notes.append(
                    f"champion stays on v{champion_mv.version}: evaluate compared with {compared}, "
                    "and the champion has moved since; clear evaluate and register to compare again"
                )
            elif gate.promote:
                promote_here(gate.reason)
                champion = version
            else:
                notes.append(f"champion stays on v{champion_mv.version}: {gate.reason}")
        elif value is not None and (theirs is None or better(float(value), theirs, gate_metric)):
            promote_here(f"{gate_metric} {float(value):.6g} beats v{champion_mv.version}'s {theirs}")
            champion = version
        else:
            notes.append(f"champion stays on v{champion_mv.version}: {gate_metric} {value} does not beat its {theirs}")
    if notes:
        mc.set_model_version_tag(name, version, T.ALIAS_NOTE, "; ".join(notes)[:4900])
    elif T.ALIAS_NOTE in (mine.tags or {}):
        mc.delete_model_version_tag(name, version, T.ALIAS_NOTE)
    return champion, notes


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def better(ours: float, theirs: float, metric: str) -> bool:
    """Whether ``ours`` beats ``theirs`` on ``metric`` (lower wins for losses and perplexities)."""
    return ours < theirs if lower_is_better(metric) else ours > theirs


def _order(mv) -> tuple:
    raw = (mv.tags or {}).get(T.RUN_TIME)
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
        return (
            f"v{mv.version} is from the run of {t1.isoformat()}, older than v{other.version}'s run of {t2.isoformat()}"
        )
    return f"v{mv.version} was registered before v{other.version}"


def _gate_value(mc, mv, metric: str) -> float | None:
    if mv.run_id:
        value = mc.get_run(mv.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    raw = (mv.tags or {}).get(T.GATE_VALUE)
    return float(raw) if raw else None
