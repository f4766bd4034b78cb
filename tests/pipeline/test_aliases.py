"""Alias history and rollback through the ``loraflow`` CLI against the real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loraflow import gate, registry
from loraflow.registry import aliases
from tests.conftest import REPO


def cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "--tracking-uri", uri, "models", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def three_versions(mlflow_server, mlflow_client):
    name = "alias-history"
    mlflow_client.create_registered_model(name)
    exp = mlflow_client.create_experiment(f"loraflow/{name}")
    for i in range(3):
        run = mlflow_client.create_run(exp)
        mlflow_client.create_model_version(
            name,
            f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={registry.RUN_KEY: f"loraflow_finetune/run-{i + 1}"},
        )
    return name


def test_rollback_and_history_round_trip(mlflow_server, mlflow_client, three_versions):
    name = three_versions
    for v in ("1", "2", "3"):
        out = cli(mlflow_server, "promote", name, v, "--reason", f"ship v{v}")
        assert out.returncode == 0, out.stderr
    assert mlflow_client.get_registered_model(name).aliases["champion"] == "3"

    out = cli(mlflow_server, "rollback", name, "--reason", "v3 answers in the wrong format")
    assert out.returncode == 0, out.stderr
    assert "version 3 -> 2" in out.stdout
    assert mlflow_client.get_registered_model(name).aliases["champion"] == "2"
    assert "wrong format" in mlflow_client.get_model_version(name, "3").tags[aliases.ROLLED_BACK]

    # A second rollback goes further back, not forward to the version just withdrawn.
    out = cli(mlflow_server, "rollback", name, "--reason", "v2 too")
    assert out.returncode == 0, out.stderr
    assert mlflow_client.get_registered_model(name).aliases["champion"] == "1"

    out = cli(mlflow_server, "history", name, "--json")
    assert out.returncode == 0, out.stderr
    h = json.loads(out.stdout)
    assert h["aliases"] == {"champion": "1"}
    assert [(m["kind"], m["from"], m["to"]) for m in h["moves"]] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("promote", "2", "3"),
        ("rollback", "3", "2"),
        ("rollback", "2", "1"),
    ]
    assert h["moves"][3]["reason"] == "v3 answers in the wrong format" and h["moves"][3]["by"]
    table = cli(mlflow_server, "history", name)
    assert table.returncode == 0 and "rollback" in table.stdout and "v3 answers in the wrong format" in table.stdout

    # A cleared-and-rerun register of v3's run (even if its gate says promote) leaves champion where rollback put it.
    mc = registry.mlflow_client(mlflow_server)
    promote = gate.Decision(True, "paired CI above margin", "1", {})
    champion, notes = aliases.advance(mc, name, "3", "eval_loss", 0.1, promote)
    assert champion == "1" and mlflow_client.get_registered_model(name).aliases["champion"] == "1"
    assert any("rolled back" in n for n in notes)


def test_rollback_with_nothing_to_go_back_to_says_what_to_do(mlflow_server, mlflow_client):
    name = "alias-history-single"
    mlflow_client.create_registered_model(name)
    run = mlflow_client.create_run(mlflow_client.create_experiment(f"loraflow/{name}"))
    mlflow_client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    out = cli(mlflow_server, "rollback", name, "--reason", "x")
    assert out.returncode == 1 and "no champion alias" in out.stderr
    assert cli(mlflow_server, "promote", name, "1", "--reason", "first").returncode == 0
    out = cli(mlflow_server, "rollback", name, "--reason", "x")
    assert out.returncode == 1 and "no earlier champion" in out.stderr and "loraflow models promote" in out.stderr
    out = cli(mlflow_server, "rollback", "no-such-model", "--reason", "x")
    assert out.returncode == 1 and "no registered model" in out.stderr
    assert cli(mlflow_server, "rollback", name).returncode == 2  # --reason is required
