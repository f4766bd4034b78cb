"""How loraflow talks to the MLflow server, in one place.

The client (``mlflow_client``), its HTTP timeouts and retries (``http_defaults``), what a
dead server or a refused login becomes (``reachable``), the one "not found" check
(``is_missing``), the one way to put a value in a filter string (``equals``) and to read
every page of a search (``all_pages``), and the two exact searches built on them
(``search_versions``, ``search_runs``). The rest of the wing calls these; nothing else in
loraflow builds an ``MlflowClient`` or a filter string.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from loraflow.errors import RegistryError, RegistryUnavailable


class NotFound(RegistryError):
    """The name, alias or version asked for is not in the registry."""


def mlflow_client(uri: str):
    """An ``MlflowClient`` whose tracking and registry server is ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def http_defaults(*, interactive: bool = False) -> None:
    """Client timeouts and retries for this process, unless the environment already sets them.

    Inside Airflow tasks they are short, because Airflow's retries (with backoff) do the
    waiting; a person at a terminal or on the UI page (``interactive``) wants a quick
    "server down", not minutes of retries.
    """
    retries, timeout = ("0", "10") if interactive else ("2", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)


# How the 3.17 client words "no answer" (transport errors, timeouts, a 5xx page from a proxy).
_UNREACHABLE = (
    "failed with exception",
    "failed with timeout exception",
    "Max retries exceeded",
    "Connection refused",
    "Read timed out",
    "failed with error code 5",
)


@contextlib.contextmanager
def reachable(uri: str, *, interactive: bool = False) -> Iterator[None]:
    """Turn "cannot reach the server" into RegistryUnavailable and a refused login into RegistryError.

    Other refusals pass through as MLflow raised them. A task's message says that the task
    retries; an ``interactive`` one (the CLI, the UI page: nothing retries) says how to fix
    the address.
    """
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise _unavailable(uri, type(exc).__name__, interactive) from None
    except MlflowException as exc:
        text = str(exc)
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        if any(s in text for s in _UNREACHABLE):
            raise _unavailable(uri, first, interactive) from None
        if "failed with error code 403" in text or "failed with error code 401" in text:
            raise RegistryError(
                f"MLflow at {uri} refused loraflow ({first}); set MLFLOW_TRACKING_USERNAME/PASSWORD, "
                "or start the server with --allowed-hosts for this host name"
            ) from None
        raise


def _unavailable(uri: str, cause: str, interactive: bool) -> RegistryUnavailable:
    if interactive:
        return RegistryUnavailable(
            f"cannot reach the MLflow tracking server at {uri}; start it or set MLFLOW_TRACKING_URI to the right server"
        )
    return RegistryUnavailable(
        f"MLflow at {uri} is unreachable ({cause}); the task retries, outputs stay in the workspace"
    )


def is_missing(exc: Exception) -> bool:
    """Whether an MLflow error says that the model, version or alias asked for does not exist.

    A missing model or version is ``RESOURCE_DOES_NOT_EXIST``; a missing alias is
    ``INVALID_PARAMETER_VALUE`` saying "not found".
    """
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def equals(key: str, value: str) -> str:
    """The filter clause "``key`` is ``value``", for any value.

    MLflow's parser takes a quoted value as written, with no escapes: a value without
    ``'`` goes in single quotes, one without ``"`` in double quotes. A value holding both
    (or ``'`` and a backslash, which the SQL tokenizer reads as an escape) cannot be
    written exactly; it becomes a ``LIKE`` pattern with each of those characters as a
    one-character wildcard. That pattern can match more than the value, so the searches
    below keep only exact matches.
    """
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value and "\\" not in value:
        return f'{key} = "{value}"'
    pattern = "".join("_" if c in "'\"\\" else c for c in value)  # backslash: Postgres' LIKE escape character
    return f"{key} LIKE '{pattern}'"


def all_pages(search: Callable[..., Any], **kwargs: Any) -> list:
    """Every result of an MLflow search method (``search_runs``, ``search_model_versions``, ...), page by page."""
    out, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def search_versions(mc, name: str, tags: dict[str, str] | None = None) -> list:
    """The versions of model ``name`` whose tags hold ``tags`` (all when none), oldest first; [] for no such model."""
    from mlflow.exceptions import MlflowException

    tags = tags or {}
    where = " and ".join([equals("name", name)] + [equals(f"tags.`{k}`", v) for k, v in tags.items()])
    try:
        found = all_pages(mc.search_model_versions, filter_string=where)
    except MlflowException as exc:
        if is_missing(exc):
            return []
        raise
    exact = [v for v in found if v.name == name and all((v.tags or {}).get(k) == val for k, val in tags.items())]
    return sorted(exact, key=lambda v: int(v.version))


def search_runs(mc, experiment_ids: list[str], tags: dict[str, str]) -> list:
    """The runs of ``experiment_ids`` whose tags hold ``tags``, newest first."""
    where = " and ".join(equals(f"tags.`{k}`", v) for k, v in tags.items())
    found = all_pages(mc.search_runs, experiment_ids=experiment_ids, filter_string=where)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def ui_url(uri: str) -> str:
    """The MLflow UI as a browser reaches it (differs from the tracking URI inside docker-compose)."""
    return os.environ.get("LORAFLOW_MLFLOW_UI_URL", uri).rstrip("/")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/runs/{run_id}"
