"""loraflow's Airflow-side errors: each says the cause and the fix in one sentence.

``retryable`` tells the DAG whether a retry can help (MLflow down: yes; bad data: no).
"""

from __future__ import annotations


class LoraflowError(Exception):
    retryable = False


class ParamsError(LoraflowError):
    """A trigger param is invalid or points somewhere it must not."""


class DataCheckError(LoraflowError):
    """The dataset fails a data check; data_report.json has the details."""


class TrainingError(LoraflowError):
    """The trainer exited non-zero; the message maps its exit code to the cause."""


class RegistryUnavailable(LoraflowError):
    """The MLflow tracking server cannot be reached; outputs stay on disk for the retry."""

    retryable = True


class RegistryError(LoraflowError):
    """MLflow answered, but refused what loraflow asked (or the outputs are not fit to register)."""
