"""loraflow's MLflow wing: the one place that talks to the tracking server and the model registry.

    client.py        the MlflowClient, HTTP timeouts and retries, "unreachable" -> RegistryUnavailable,
                     the one way to quote a filter value, to page a search, to tell "not found"
    tags.py          the names loraflow writes into MLflow: tags, aliases, experiments, artifact folders
    versions.py      finding and reading versions (by alias, number or newest), their lineage and files
    aliases.py       every alias move: register's forward-only moves, promote, rollback, the history
    registration.py  what the pipeline writes: the MLflow run of a DAG run, its logs, the model
                     version (idempotent by run key), merged exports

The names below are the wing's public face: the rest of loraflow calls them with plain
values (a tracking URI, a model name, a run key) and gets plain values back.
"""

from loraflow.errors import RegistryError, RegistryUnavailable
from loraflow.registry.aliases import ROLLED_BACK, advance, better, history, promote, rollback
from loraflow.registry.client import NotFound, http_defaults, mlflow_client, reachable, ui_url
from loraflow.registry.registration import (
    Registration,
    check_privacy,
    close_run,
    ensure_run,
    is_registered,
    metric_history,
    output_digest,
    register,
    register_export,
    registered_version,
    verify_outputs,
)
from loraflow.registry.tags import (
    ADAPTER_SHA256,
    ALIAS_NOTE,
    BASE_MODEL,
    BASE_REF,
    BASE_SHA256,
    CHALLENGER,
    CHAMPION,
    DAG_ID,
    FINGERPRINT,
    GATE_METRIC,
    GATE_VALUE,
    GIT_COMMIT,
    IMAGE,
    IMAGE_DIGEST,
    LORAFLOW_VERSION,
    PROMOTION_REASON,
    RUN_ID,
    RUN_KEY,
    RUN_TIME,
    RUNTIME,
    SPEC_HASH,
    TRAINER_GIT_COMMIT,
    TRAINER_VERSION,
    experiment_name,
)
from loraflow.registry.versions import (
    Ref,
    alias_version,
    base_model_path,
    download_model,
    list_models,
    mlflow_run_for,
    pull,
    read_reference,
    resolve_base,
    run_params,
    show,
    versions_by_run_key,
)

__all__ = [
    "ADAPTER_SHA256", "ALIAS_NOTE", "BASE_MODEL", "BASE_REF", "BASE_SHA256", "CHALLENGER", "CHAMPION", "DAG_ID",
    "FINGERPRINT", "GATE_METRIC", "GATE_VALUE", "GIT_COMMIT", "IMAGE", "IMAGE_DIGEST", "LORAFLOW_VERSION",
    "PROMOTION_REASON", "ROLLED_BACK", "RUN_ID", "RUN_KEY", "RUN_TIME", "RUNTIME", "SPEC_HASH", "TRAINER_GIT_COMMIT",
    "TRAINER_VERSION", "NotFound", "Ref", "Registration", "RegistryError", "RegistryUnavailable", "advance",
    "alias_version", "base_model_path", "better", "check_privacy", "close_run", "download_model", "ensure_run",
    "experiment_name", "history", "http_defaults", "is_registered", "list_models", "metric_history", "mlflow_client",
    "mlflow_run_for", "output_digest", "promote", "pull", "reachable", "read_reference", "register", "register_export",
    "registered_version", "resolve_base", "rollback", "run_params", "show", "ui_url", "verify_outputs",
    "versions_by_run_key",
]
