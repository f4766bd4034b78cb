"""Deployment settings read from the environment (never from trigger params).

One place for the names: ``LORAFLOW_HOME``, ``LORAFLOW_MODELS``, ``LORAFLOW_RUNTIME``,
``LORAFLOW_IMAGE``, ``LORAFLOW_DATA_ROOTS``, ``MLFLOW_TRACKING_URI``...
"""

from __future__ import annotations

import os
from pathlib import Path

DAG_ID = "loraflow_finetune"
CONTAINER_WORKSPACE = "/workspace"
CONTAINER_MODELS = "/models"


def home() -> Path:
    return Path(os.environ.get("LORAFLOW_HOME", Path.home() / "loraflow")).resolve()


def models_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_MODELS", home() / "models")).resolve()


def runs_dir() -> Path:
    return home() / "runs"


def data_roots() -> list[Path]:
    """Directories trigger params may read datasets from (os.pathsep-separated)."""
    raw = os.environ.get("LORAFLOW_DATA_ROOTS")
    roots = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [home() / "data", repo_root() / "examples"]
    return [r.resolve() for r in roots]


def default_runtime() -> str:
    return os.environ.get("LORAFLOW_RUNTIME", "local")


def image() -> str:
    return os.environ.get("LORAFLOW_IMAGE", "loraflow-trainer:0.1.0")


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


def repo_root() -> Path:
    """The loraflow checkout (bundled examples live here)."""
    return Path(__file__).resolve().parents[2]
