"""The production stack end to end: compose up on local images, runs through the REST API and Celery.

In file order (one stack for the module): the DAG imports; a run with the form's defaults
and one with runtime=docker both train in a trainer container that a Celery worker started
through the socket proxy, and register in MLflow on Postgres; what `down` (without -v)
keeps; two workers, two runs at once; a sweep's trials queued on one GPU slot; a worker killed
mid-train, its run resumed on the other.
"""

from __future__ import annotations

import time

import docker
import pytest

from loraflow import registry, sweep

SWEEP = sweep.DAG_ID
MODEL = "loraflow-model"  # the form's default registered_model_name
LINEAGE = (
    registry.RUN_KEY,
    registry.DAG_ID,
    registry.RUN_ID,
    registry.FINGERPRINT,
    registry.BASE_MODEL,
    registry.IMAGE,
    registry.IMAGE_DIGEST,
    registry.RUNTIME,
)


def _versions_of(stack, run_id: str) -> list[dict]:
    return [v for v in stack.versions(MODEL) if _tags(v).get(registry.RUN_ID) == run_id]


def _tags(version: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in version.get("tags", [])}


def _no_trainer_container_left(run_id: str) -> None:
    client = docker.from_env()
    try:
        left = client.containers.list(all=True, filters={"label": f"loraflow.run_id={run_id}"})
    finally:
        client.close()
    assert not left, f"trainer containers of {run_id} left behind: {[c.name for c in left]}"


def test_the_dag_imports_in_the_stack_without_errors(stack):
    assert stack.api("GET", "/importErrors")["total_entries"] == 0
    dag = stack.api("GET", "/dags/loraflow_finetune")
    assert dag["is_paused"] is False
    assert dag["has_import_errors"] is False


def test_form_default_and_docker_runs_train_through_celery_and_the_socket_proxy_and_register(stack):
    start = time.monotonic()
    runs = [stack.trigger({}), stack.trigger({"runtime": "docker"})]
    states = stack.wait_runs(runs)
    stack.timings["two_runs_one_worker_s"] = round(time.monotonic() - start, 1)
    assert states == {r: "success" for r in runs}, states

    workers = {c[:12] for c in stack.containers("airflow-worker")}
    for run_id in runs:
        tis = stack.task_instances(run_id)
        train = tis["train"]
        assert train["state"] == "success"
        # The Celery worker ran it (its hostname is the worker container's id).
        assert train["hostname"][:12] in workers, (train["hostname"], workers)
        log = stack.task_log(run_id, "train", train["try_number"])
        assert "403" not in log and "Forbidden" not in log
        assert "loss" in log, log[-2000:]
        versions = _versions_of(stack, run_id)
        assert len(versions) == 1, versions
        tags = _tags(versions[0])
        assert {k for k in LINEAGE if tags.get(k)} == set(LINEAGE), tags
        assert tags[registry.RUNTIME] == "docker" and tags[registry.DAG_ID] == "loraflow_finetune"
        assert tags[registry.IMAGE_DIGEST].startswith("sha256:")
        _no_trainer_container_left(run_id)

    aliases = stack.aliases(MODEL)
    assert "challenger" in aliases and "champion" in aliases
    assert {aliases["challenger"], aliases["champion"]} <= {v["version"] for r in runs for v in _versions_of(stack, r)}

    # The proxy passed the trainer's calls and refused none of them.
    proxy = stack.logs("docker-socket-proxy")
    assert "/containers/create" in proxy and "/wait" in proxy, proxy[-2000:]
    assert " 403 " not in proxy, [line for line in proxy.splitlines() if " 403 " in line][:5]
    # MLflow's store is the Postgres database (the version rows are there).
    count = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "airflow", "-d", "mlflow", "-tAc", "SELECT count(*) FROM model_versions"
    ).stdout.strip()
    assert int(count) == len(stack.versions(MODEL))


def test_down_without_volumes_keeps_versions_artifacts_and_the_admin_password(stack):
    before = {v["version"]: v["run_id"] for v in stack.versions(MODEL)}
    assert before, "the previous test registered nothing"
    aliases = stack.aliases(MODEL)
    stack.compose("down")  # containers go; named volumes and host folders stay
    stack.timings["up_again_s"] = round(stack.up(), 1)
    # Every container was re-created: the same password still signs in (stack.token()).
    assert stack.api("GET", "/dags/loraflow_finetune")["is_paused"] is False
    assert {v["version"]: v["run_id"] for v in stack.versions(MODEL)} == before
    assert stack.aliases(MODEL) == aliases
    champion = aliases["champion"]
    version = stack.mlflow_api("GET", "model-versions/get", {"name": MODEL, "version": champion})["model_version"]
    files = stack.mlflow_api("GET", "artifacts/list", {"run_id": version["run_id"], "path": "model"})
    names = {f["path"].rsplit("/", 1)[-1] for f in files.get("files", [])}
    assert "MLmodel" in names, names


@pytest.mark.parametrize("workers", [2])
def test_two_workers_two_runs_at_once_queue_on_the_gpu_pool_and_both_register(stack, workers):
    start = time.monotonic()
    stack.timings["scale_up_s"] = round(stack.up("--scale", f"airflow-worker={workers}", "--no-recreate"), 1)
    assert len(stack.containers("airflow-worker")) == workers
    runs = [stack.trigger({"runtime": "docker"}) for _ in range(2)]
    states = stack.wait_runs(runs)
    stack.timings["two_runs_two_workers_s"] = round(time.monotonic() - start, 1)
    assert states == {r: "success" for r in runs}, states
    trains = [stack.task_instances(r)["train"] for r in runs]
    # One GPU slot: the second train started after the first ended, whichever worker ran it.
    first, second = sorted(trains, key=lambda ti: ti["start_date"])
    assert second["start_date"] >= first["end_date"], (first, second)
    for run_id in runs:
        assert len(_versions_of(stack, run_id)) == 1
        _no_trainer_container_left(run_id)


def test_a_sweep_on_two_workers_queues_its_trials_on_the_one_gpu_slot_and_registers_the_winner(stack):
    """loraflow_sweep through the REST API: three mapped trials, two workers that could run them at
    once, one GPU slot: the scheduler's pool runs one trial task at a time. One parent MLflow run,
    three child runs, one version (the winning trial's)."""
    if len(stack.containers("airflow-worker")) < 2:
        stack.up("--scale", "airflow-worker=2", "--no-recreate")
    name = "stack-sweep"
    overrides = [{"learning_rate": 1e-5}, {"learning_rate": 1e-2}, {"learning_rate": 2e-3, "lora_r": 4}]
    conf = {"runtime": "docker", "registered_model_name": name, "max_steps": 12, "sweep": overrides}
    start = time.monotonic()
    run_id = stack.trigger(conf, dag=SWEEP)
    assert stack.wait_runs([run_id], dag=SWEEP) == {run_id: "success"}
    stack.timings["sweep_three_trials_s"] = round(time.monotonic() - start, 1)

    tis = stack.task_instances(run_id, dag=SWEEP)
    trials = [tis[f"trial.{task}[{i}]"] for i in range(3) for task in ("train", "evaluate")]
    assert {ti["state"] for ti in trials} == {"success"}, trials
    assert {ti["pool"] for ti in trials} == {"loraflow_gpu"}
    spans = sorted((ti["start_date"], ti["end_date"]) for ti in trials)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False)), spans

    [parent] = stack.runs(f"loraflow/{name}", f"tags.`{sweep.TAG_TRIALS}` = '3'")
    parent_tags = {t["key"]: t["value"] for t in parent["data"].get("tags", [])}
    children = stack.runs(f"loraflow/{name}", f"tags.`{sweep.PARENT_RUN}` = '{parent['info']['run_id']}'")
    assert len(children) == 3, [c["info"]["run_id"] for c in children]
    [version] = [v for v in stack.versions(name) if _tags(v).get(registry.RUN_ID) == run_id]
    assert _tags(version)[sweep.TAG_TRIAL] == parent_tags[sweep.TAG_WINNER]
    assert stack.aliases(name)["champion"] == version["version"]
    _no_trainer_container_left(run_id)


def test_a_worker_killed_mid_train_the_retry_on_the_other_resumes_and_one_version_registers(stack):
    """The fault a multi-worker deployment meets: the Celery worker running train dies (here:
    ``docker rm -f``, a SIGKILL with no restart). Its trainer container lives on in the engine.
    The scheduler fails the task when its heartbeats stop (AIRFLOW_TASK_HEARTBEAT_TIMEOUT), the
    retry runs on the surviving worker, stops the orphan (which checkpoints), resumes from the
    newest checkpoint, and the run registers exactly one version."""
    if len(stack.containers("airflow-worker")) < 2:
        stack.up("--scale", "airflow-worker=2", "--no-recreate")
    run_id = stack.trigger({"runtime": "docker", "max_steps": 600, "save_steps": 10, "eval_steps": 600})
    deadline = time.monotonic() + 1800
    train: dict = {}
    ckpts = None
    while time.monotonic() < deadline:
        train = stack.task_instances(run_id).get("train", {})
        if ckpts is None and train.get("state") == "running":
            ckpts = stack.host_path(stack.xcom(run_id, "prepare")) / "output" / "checkpoints"
        if ckpts is not None and list(ckpts.glob("checkpoint-*/trainer_state.json")):
            break
        assert train.get("state") not in ("success", "failed", "upstream_failed"), train
        time.sleep(2)
    else:
        raise AssertionError(f"train never ran past a checkpoint: {train}")
    workers = stack.containers("airflow-worker")
    [victim] = [c for c in workers if c.startswith(train["hostname"][:12])]
    client = docker.from_env()
    try:
        client.containers.get(victim).remove(force=True)  # SIGKILL, and it does not come back
    finally:
        client.close()
    start = time.monotonic()
    assert stack.wait_runs([run_id]) == {run_id: "success"}
    stack.timings["killed_worker_recovery_s"] = round(time.monotonic() - start, 1)

    retried = stack.task_instances(run_id)["train"]
    assert retried["try_number"] == 2, retried
    assert retried["hostname"][:12] != train["hostname"][:12]
    assert retried["hostname"][:12] in {c[:12] for c in stack.containers("airflow-worker")}
    log = stack.task_log(run_id, "train", 2)
    assert "an earlier try" in log, log[-3000:]  # the orphan was found, stopped and removed
    assert "resuming from checkpoint /workspace/output/checkpoints/checkpoint-" in log, log[-3000:]
    assert len(_versions_of(stack, run_id)) == 1
    _no_trainer_container_left(run_id)
