"""Deployment settings read from the environment (never from trigger params).

One place for the names: ``LORAFLOW_HOME``, ``LORAFLOW_MODELS``, ``LORAFLOW_RUNTIME``,
``LORAFLOW_IMAGE``, ``LORAFLOW_DATA_ROOTS``, ``MLFLOW_TRACKING_URI``...
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

DAG_ID = "loraflow_finetune"
CONTAINER_WORKSPACE = "/workspace"
CONTAINER_MODELS = "/models"

# sqlite3's busy timeout for an Airflow metadata DB on sqlite (Python's default is 5 s), as
# the local stack configures it. Airflow 3.3 already opens sqlite in WAL mode
# (utils/orm_event_handlers.py); what it does not set is how long a writer waits for another,
# and a burst of REST triggers against a busy scheduler waited longer than 5 s ("database is
# locked", HTTP 500). Airflow reads these through [database] sql_alchemy_connect_args /
# sql_alchemy_connect_args_async, an import path, so they live where every Airflow process
# can import them: in the plugin.
SQLITE_CONNECT_ARGS: dict = {"timeout": 60}
SQLITE_CONNECT_ARGS_ASYNC: dict = {"timeout": 60}


def home() -> Path:
    return Path(os.environ.get("LORAFLOW_HOME", Path.home() / "loraflow")).resolve()


def models_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_MODELS", home() / "models")).resolve()


def runs_dir() -> Path:
    return home() / "runs"


def data_roots() -> list[Path]:
    """Directories trigger params may read datasets from (os.pathsep-separated)."""
    raw = os.environ.get("LORAFLOW_DATA_ROOTS")
    roots = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [home() / "data", examples_dir()]
    return [r.resolve() for r in roots]


def default_runtime() -> str:
    return os.environ.get("LORAFLOW_RUNTIME", "local")


def trust_remote_code() -> bool:
    """Whether trainers may run model code shipped with a hub repository (``LORAFLOW_TRUST_REMOTE_CODE``).

    A deployment decision, never a trigger param: with a hub model it runs that repository's
    Python on the worker. Off unless set to 1/true/yes.
    """
    return os.environ.get("LORAFLOW_TRUST_REMOTE_CODE", "").strip().lower() in ("1", "true", "yes")


def image() -> str:
    return os.environ.get("LORAFLOW_IMAGE", "loraflow-trainer:0.1.0")


def train_retries() -> int:
    """Retries of the train and evaluate tasks (``LORAFLOW_TRAIN_RETRIES``, default 1).

    A retry resumes from the newest checkpoint, on any worker: it is for interruptions (a
    worker or host lost mid-run, a preemption). Faults a retry cannot fix fail at once
    (``TrainerFailed.retry_helps``), so a retry never spends GPU time on them.
    """
    raw = os.environ.get("LORAFLOW_TRAIN_RETRIES", "1").strip()
    if not raw.isdigit():
        raise ValueError(f"LORAFLOW_TRAIN_RETRIES={raw!r} is not a whole number of retries (0 for none)")
    return int(raw)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")


def docker_url() -> str:
    return os.environ.get("LORAFLOW_DOCKER_URL", os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))


def host_path(path: Path) -> str:
    """A path as the Docker engine sees it (differs when Airflow runs in a container itself)."""
    mapping = os.environ.get("LORAFLOW_HOST_HOME")
    if mapping:
        return str(Path(mapping) / path.resolve().relative_to(home()))
    return str(path.resolve())


def examples_dir() -> Path:
    """The bundled examples (sample datasets): ``LORAFLOW_EXAMPLES``, else a checkout's ``examples/``.

    A non-editable install puts this module in site-packages, far from any checkout; the
    wheel then carries the examples under ``<prefix>/share/loraflow/examples``, so the form's
    default dataset resolves for triggered and scheduled runs wherever loraflow was installed.
    """
    raw = os.environ.get("LORAFLOW_EXAMPLES")
    if raw:
        return Path(raw).resolve()
    checkout = Path(__file__).resolve().parents[2] / "examples"
    if checkout.is_dir():
        return checkout
    # A wheel install carries them as data files (pyproject.toml [tool.setuptools.data-files]).
    return Path(sysconfig.get_path("data")) / "share" / "loraflow" / "examples"


def repo_root() -> Path:
    """What relative dataset paths such as ``examples/data/...`` (the form's defaults) resolve against."""
    return examples_dir().parent
