"""Faults with nothing lost: a full workspace disk, and an adapter corrupted after training.

(Killed trainers and resume: tests/trainer and tests/docker; MLflow down during register:
tests/pipeline/test_dag.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime

import pytest

from loraflow import config, tasks, workspace
from tests.pipeline.conftest import conf, load_dag, task_states

pytestmark = pytest.mark.slow


def _run_id(run_after: datetime) -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunType

    return DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=run_after, run_after=run_after)


@pytest.fixture
def small_output_volume():
    """Mount a 256 KiB tmpfs where a run's output/ will be (the disk that fills up)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    run_after = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    out = workspace.run_dir(config.DAG_ID, _run_id(run_after)) / "output"
    out.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield run_after, out
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_disk_full_fails_training_with_the_cause_and_registers_nothing(dag, small_output_volume, mlflow_client):
    from airflow.sdk.exceptions import AirflowFailException

    from loraflow.operators import LoraflowTrainOperator

    run_after, out = small_output_volume
    name = "disk-full"
    dr = load_dag().test(run_after=run_after, run_conf=conf(name, save_steps=4))
    tis = task_states(dr)
    assert dr.state == "failed", tis
    assert tis["train"] == "failed" and tis["register"] == "upstream_failed" and tis["teardown"] == "success", tis
    assert not (out / "_SUCCESS").exists() and not list(out.glob(".staging-*"))  # nothing that looks complete
    # What the task said, failing without its retries (a retry on the still-full disk says it again).
    with pytest.raises(AirflowFailException) as err:
        LoraflowTrainOperator(task_id="train", workspace=str(out.parent)).execute({})
    assert "exit 7" in str(err.value) and "no space left" in str(err.value), str(err.value)
    assert not mlflow_client.search_registered_models(f"name = '{name}'")
    exp = mlflow_client.get_experiment_by_name(f"loraflow/{name}")
    [run] = mlflow_client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"


def test_register_refuses_an_adapter_corrupted_after_training(run_dag, mlflow_client):
    from airflow.sdk.exceptions import AirflowFailException

    name = "corrupt-adapter"
    state, tis, ws = run_dag(conf(name))
    assert state == "success", tis
    [before] = mlflow_client.search_model_versions(f"name = '{name}'")
    adapter = ws / "output" / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights, as a bad disk or a stray writer would leave
    adapter.write_bytes(bytes(data))
    (ws / "pipeline.json").write_text(
        (ws / "pipeline.json").read_text().replace('"run_id": "', '"run_id": "retrained-', 1)
    )  # a different run key: register would create a new version

    with pytest.raises(AirflowFailException, match="does not match its checksum"):
        tasks.register(str(ws), None, {"ti": None})
    assert [v.version for v in mlflow_client.search_model_versions(f"name = '{name}'")] == [before.version]
