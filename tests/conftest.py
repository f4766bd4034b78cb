"""Session stack for the tests: a real MLflow server over HTTP, a migrated Airflow DB, the tiny model.

Airflow reads its configuration when first imported, so the environment is set in
``pytest_configure``, before any test module imports airflow.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CHAT = REPO / "examples" / "data" / "sample_chat.jsonl"
# Trigger params that train the tiny model in seconds: the DAG tests' common conf.
FAST = {
    "max_steps": 12,
    "learning_rate": 1e-2,
    "max_seq_length": 128,
    "num_sample_generations": 1,
    "per_device_train_batch_size": 8,
}
SAMPLE_PC = REPO / "examples" / "data" / "sample_prompt_completion.jsonl"
_STATE: dict = {}


def pytest_configure(config):
    sys.path.insert(0, str(REPO / "plugins"))
    sys.path.insert(0, str(REPO / "devtools"))  # loraflow_devstack: dev tooling, not in the loraflow package
    from loraflow_devstack import LocalStack, free_port

    home = Path(tempfile.mkdtemp(prefix="loraflow-test-"))
    stack = LocalStack(
        home=home, repo=REPO, mlflow_port=free_port(), airflow_port=free_port(), log_server_port=free_port()
    )
    os.environ["LORAFLOW_MODELS"] = str(home / "models")
    os.environ["LORAFLOW_DATA_ROOTS"] = os.pathsep.join([str(home / "data"), str(REPO / "examples")])
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "20"
    # The fault tests assert what one try of train/evaluate does and then run the retry
    # themselves; the DAG's own retry (1 by default) is the stack test's killed worker.
    os.environ.setdefault("LORAFLOW_TRAIN_RETRIES", "0")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on the cores: one math thread each, no oversubscription
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    stack.configure_airflow_env()
    (home / "data").mkdir(parents=True, exist_ok=True)
    _STATE["stack"] = stack


def pytest_xdist_make_scheduler(config, log):
    """``pytest -n 2 --dist loadfile`` (``make test``): a module stays on one worker, so its module
    fixtures (a scheduler, an api-server) start once, and the Docker engine's tests (tests/docker,
    tests/stack) run on one worker, one after another: they watch the engine's containers by label,
    not by worker. Each worker has its own home: its own MLflow server, Airflow DB and model cache.
    (xdist's loadgroup marks do not reach pytest 9's node ids, hence a scheduler.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "docker-engine" if path.startswith(("tests/docker/", "tests/stack/")) else path

    return ModuleScheduling(config, log)


def pytest_unconfigure(config):
    stack = _STATE.get("stack")
    if stack is not None:
        stack.stop_all()
        if not os.environ.get("LORAFLOW_KEEP_TEST_HOME"):
            shutil.rmtree(stack.home, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def airflow_db_left_sound(request):
    """After each module, a warning if the session's Airflow DB fails SQLite's own check: a module
    that corrupts it is named here, not only the module that happens to open it next. A warning, not
    an error: the check's own connection once met a "disk I/O error" (cause unknown) after a module
    whose tests had all passed on that DB."""
    yield
    db = _STATE["stack"].airflow_home / "airflow.db"
    if db.exists():
        import contextlib
        import sqlite3
        import warnings

        try:
            with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as exc:
            result = f"{type(exc).__name__}: {exc}"
        if result != "ok":
            warnings.warn(
                f"after {request.module.__name__} the Airflow DB {db} fails quick_check: {result}", stacklevel=1
            )


@pytest.fixture(scope="session")
def stack():
    return _STATE["stack"]


@pytest.fixture(scope="session")
def tiny_model(stack) -> Path:
    """The tiny Llama model + tokenizer, built once, trained on the sample data's vocabulary."""
    return stack.ensure_tiny_model(corpus=SAMPLE_CHAT)


@pytest.fixture(scope="session")
def mlflow_server(stack) -> str:
    stack.start_mlflow()
    return stack.mlflow_uri


@pytest.fixture(scope="session")
def airflow_db(stack) -> Path:
    stack.migrate_airflow_db()
    return stack.airflow_home / "airflow.db"


@pytest.fixture
def data_dir(stack) -> Path:
    """An allowed data root (LORAFLOW_DATA_ROOTS) for datasets a test writes."""
    return stack.home / "data"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
