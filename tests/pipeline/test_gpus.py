"""GPU leases: the per-GPU locks that keep two trainers off one GPU (real flock files).

The host's GPUs are named by LORAFLOW_GPU_IDS here (no GPU driver on this machine): the
lease logic only deals in ids, locks and container labels, which are all real.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraflow import gpus
from loraflow.errors import TrainingError


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLOW_GPU_IDS", "0,1")
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))


def test_auto_takes_a_free_gpu_each_and_a_third_run_waits(two_gpus):
    a = gpus.acquire("auto")
    b = gpus.acquire("auto")
    assert {a.visible, b.visible} == {"0", "1"}
    with pytest.raises(TrainingError, match="no free GPU"):
        gpus.acquire("auto", timeout=0.3, poll=0.1)
    a.release()
    c = gpus.acquire("auto", timeout=5, poll=0.1)
    assert c.ids == a.ids
    b.release()
    c.release()


def test_a_gpu_held_by_another_process_is_busy_until_that_process_dies(two_gpus, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; sys.path.insert(0, 'plugins'); from loraflow import gpus\n"
                "lease = gpus.acquire('0'); print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert gpus.acquire("auto").ids == ["1"]  # 0 is taken by the other process
        with pytest.raises(TrainingError):
            gpus.acquire("0", timeout=0.3, poll=0.1)
    finally:
        holder.kill()  # a killed worker: the kernel drops its lock
        holder.wait()
    assert gpus.acquire("0", timeout=5, poll=0.1).ids == ["0"]


def test_a_gpu_labelled_on_a_running_container_counts_as_busy(two_gpus):
    lease = gpus.acquire("auto", busy=lambda: {"0"})  # an orphaned container of a dead worker holds 0
    assert lease.ids == ["1"]
    lease.release()


def test_unknown_gpu_ids_and_cpu_hosts(two_gpus, monkeypatch):
    with pytest.raises(TrainingError, match="this host has 0, 1"):
        gpus.acquire("7")
    assert gpus.acquire("none").cpu_only
    monkeypatch.setenv("LORAFLOW_GPU_IDS", "")
    assert gpus.acquire("auto", log=lambda m: None).cpu_only  # no GPUs: train on CPU
    assert gpus.acquire("all").ids is None  # the engine decides (and says when it has no GPU runtime)


def test_pool_is_sized_to_the_gpus(monkeypatch):
    monkeypatch.setenv("LORAFLOW_GPU_IDS", "0,1,2,3")
    monkeypatch.delenv("LORAFLOW_GPU_SLOTS", raising=False)
    assert gpus.pool_slots() == 4
    monkeypatch.setenv("LORAFLOW_GPU_SLOTS", "2")
    assert gpus.pool_slots() == 2


def test_setup_creates_the_training_pool(airflow_db):
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        pool = session.scalar(select(Pool).where(Pool.pool == gpus.pool_name()))
    assert pool is not None and pool.slots == gpus.pool_slots()


def test_a_run_takes_one_pool_slot_per_gpu_it_asks_for(two_gpus):
    assert [gpus.slots_for(g) for g in ("none", "auto", "0", "0,1", "all")] == [1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "ids, request_, expected",
    [
        ("", "7", "this worker has no GPU"),  # used to lease 7 and train on CPU
        ("0,1", "7", "this host has 0, 1"),
        ("0,1", "0,0", "names a GPU twice"),
        ("0,1,2,3", "0,1,2", "the pool loraflow_gpu has 2 slot"),  # would wait for slots forever
    ],
    ids=["gpu-on-a-cpu-host", "unknown-id", "duplicate", "more-than-the-pool"],
)
def test_gpu_requests_the_worker_cannot_serve_are_refused_before_anything_starts(
    monkeypatch, tmp_path, ids, request_, expected
):
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFLOW_GPU_IDS", ids)
    monkeypatch.setenv("LORAFLOW_GPU_SLOTS", "2")
    with pytest.raises(TrainingError, match=expected):
        gpus.acquire(request_, timeout=0.1, poll=0.1)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"gpus": "0,1,2"}, "asks for 3 GPUs, but the pool loraflow_gpu has 2 slot"),
        ({"gpus": "0,1", "dp_enabled": True}, "dp_enabled trains on one GPU"),
    ],
    ids=["more-than-the-pool", "dp-on-two-gpus"],
)
def test_a_trigger_the_gpu_pool_cannot_serve_fails_in_prepare(monkeypatch, tiny_model, overrides, expected):
    from loraflow import workspace
    from loraflow.errors import ParamsError
    from tests.pipeline.conftest import conf

    monkeypatch.setenv("LORAFLOW_GPU_SLOTS", "2")
    with pytest.raises(ParamsError, match=expected):
        workspace.prepare(conf("gpu-refusals", **overrides), "loraflow_finetune", f"refused-{len(overrides)}", "manual")
    assert not workspace.run_dir("loraflow_finetune", f"refused-{len(overrides)}").exists()
