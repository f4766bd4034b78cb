"""Sweeps on real parts: the loraflow_sweep DAG through dag.test() on the migrated DB, the MLflow
server over HTTP, real training and evaluation of the tiny model (local runtime) per trial."""

from __future__ import annotations

import json

import pytest

from loraflow import gate, gpus, registry, sweep
from loraflow.errors import ParamsError
from tests.pipeline.conftest import conf, load_dag, task_states, workspace_of

pytestmark = pytest.mark.slow

# Three trials that train differently: the winner is whichever scores best on the shared eval set.
TRIALS = [{"learning_rate": 1e-5}, {"learning_rate": 1e-2}, {"learning_rate": 2e-3, "lora_r": 4}]


def trial_tis(dr):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dr.dag_id,
                TaskInstance.run_id == dr.run_id,
                TaskInstance.task_id.in_(("trial.train", "trial.evaluate")),
            )
        ).all()
        return [
            (ti.task_id, ti.map_index, str(ti.state), ti.pool, ti.pool_slots, ti.start_date, ti.end_date) for ti in tis
        ]


def form_default(name: str):
    from loraflow import params

    return params.build_params(form=params.SWEEP_FORM)[name].value


@pytest.fixture(scope="module")
def one_slot_pool(airflow_db):
    """The GPU pool with one slot, as on a one-GPU worker (the default on a host without GPUs)."""
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        pool = session.scalar(select(Pool).where(Pool.pool == gpus.pool_name()))
        slots, pool.slots = pool.slots, 1
    yield gpus.pool_name()
    with create_session() as session:
        session.scalar(select(Pool).where(Pool.pool == gpus.pool_name())).slots = slots


def test_a_sweep_of_three_trials_queues_on_one_slot_and_registers_the_winner(
    dag, one_slot_pool, mlflow_client, mlflow_server
):
    name = "sweep-three"
    dr = load_dag(sweep.DAG_ID).test(run_conf={**conf(name), "sweep": TRIALS})
    states = task_states(dr)
    assert dr.state == "success", states
    ws = workspace_of(dr)

    # every trial trained and was evaluated, on the GPU pool's one slot, one task at a time
    tis = trial_tis(dr)
    assert sorted((t, i) for t, i, *_ in tis) == [(t, i) for t in ("trial.evaluate", "trial.train") for i in range(3)]
    assert {(state, pool, slots) for _, _, state, pool, slots, _, _ in tis} == {("success", one_slot_pool, 1)}
    spans = sorted((start, end) for *_, start, end in tis)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), spans

    # the same eval set for every trial: the winner is the lowest eval loss (no champion yet, so the gate
    # would promote any of them)
    scores = {}
    for i in range(3):
        ev = json.loads((ws / f"trial-{i}" / "output" / "eval.json").read_text())
        scores[i] = ev["models"]["challenger"]["eval_loss"]
        assert ev["n_examples"] == json.loads((ws / "fingerprint.json").read_text())["eval_rows"]
    assert len(set(scores.values())) == 3, scores  # the trials really trained differently
    best = min(scores, key=scores.get)

    # MLflow: one parent run, three children (MLflow's parentRunId), each with its trial's params and metrics
    exp = mlflow_client.get_experiment_by_name(registry.experiment_name(name))
    runs = mlflow_client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags[registry.RUN_KEY] == f"{dr.dag_id}/{dr.run_id}"]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert parent.data.tags[sweep.TAG_TRIALS] == "3" and parent.data.tags[sweep.TAG_WINNER] == str(best)
    assert parent.info.status == "FINISHED"
    children = {int(r.data.tags[sweep.TAG_TRIAL]): r for r in runs if r is not parent}
    assert sorted(children) == [0, 1, 2]
    for i, child in children.items():
        assert child.data.tags[sweep.PARENT_RUN] == parent.info.run_id
        assert child.data.tags[registry.RUN_KEY] == f"{dr.dag_id}/{dr.run_id}/trial-{i}"
        assert float(child.data.params["learning_rate"]) == TRIALS[i]["learning_rate"]
        assert child.data.params["lora_r"] == str(TRIALS[i].get("lora_r", form_default("lora_r")))
        assert "eval_loss" in child.data.metrics and child.info.status == "FINISHED"
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(scores[best])

    # exactly one version, the winner's, champion as the model's first version, with its gate report
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    v1 = versions[0]
    assert v1.run_id == children[best].info.run_id
    assert v1.tags[registry.RUN_KEY] == f"{dr.dag_id}/{dr.run_id}/trial-{best}"
    assert v1.tags[sweep.TAG_TRIAL] == str(best) and json.loads(v1.tags[sweep.TAG_OVERRIDES]) == TRIALS[best]
    assert v1.tags[gate.TAG_DECISION] == "promote"
    assert dict(mlflow_client.get_registered_model(name).aliases) == {"champion": "1", "challenger": "1"}
    assert {a.path for a in mlflow_client.list_artifacts(v1.run_id, "evaluation")} >= {gate.REPORT_ARTIFACT}
    losers = [r for i, r in children.items() if i != best]
    assert all(not mlflow_client.list_artifacts(r.info.run_id, "model") for r in losers)  # no model logged

    # the sweep's table in the parent run
    table = json.loads(open(mlflow_client.download_artifacts(parent.info.run_id, sweep.TABLE_ARTIFACT)).read())
    assert table["winner"] == best and [t["trial"] for t in table["trials"]] == [0, 1, 2]
    assert [t["overrides"] for t in table["trials"]] == TRIALS
    assert [t["eval_loss"] for t in table["trials"]] == pytest.approx([scores[i] for i in range(3)])
    assert [t["winner"] for t in table["trials"]] == [i == best for i in range(3)]
    assert [t.get("version") for t in table["trials"]] == ["1" if i == best else None for i in range(3)]

    # the UI page: the sweep's table under its run, the winner's version with its gate report link
    from airflow.utils.session import create_session

    from loraflow.ui import app, data, page

    with create_session() as session:
        ov = data.overview(session, mlflow_server)
    row = next(r for r in ov.rows if r.run_key == f"{dr.dag_id}/{dr.run_id}")
    assert [v["version"] for v in row.versions] == ["1"] and row.sweep["winner"] == best
    html = page.render(ov)
    assert "<b>Sweep</b> (3 trials" in html and "gate report" in html and "learning_rate=0.01" in html
    assert f"/loraflow/gate-report?name={name}&amp;version=1" in html
    report = app.gate_report(name=name, version="1")
    assert report.status_code == 200 and "promoted to champion" in report.body.decode()
    assert "sandbox" in report.headers["content-security-policy"]


BAD_SWEEPS = [
    ({"lora_rank": [4, 8]}, "'lora_rank' is not a trainer setting of the form"),
    ({"gate_margin": [0.0, 0.1]}, "gate_margin is a pipeline setting"),
    ({"base_model": ["tiny-llama"]}, "base_model cannot vary across trials"),
    ({"lora_r": []}, "sweep key lora_r has an empty list"),
    ({"lora_r": 8}, "sweep key lora_r must map to a list of values, not 8"),
    ({"lora_r": [4, 8, 16, 32, 64], "learning_rate": [1e-4, 3e-4, 1e-3, 3e-3]}, "has 20 trials (5 x 4), more than"),
    ([{"lora_r": 4}] * 17, "lists 17 trials, more than the limit of 16"),
    ([{"lora_r": 4}, "lora_r=8"], 'sweep trial 1 is "lora_r=8", not an object'),
    ({"lora_r": [4, 0]}, "sweep trial 1 (lora_r=0): "),
    ({"learning_rate": [1e-4, -1.0]}, "sweep trial 1 (learning_rate=-1.0): invalid trigger param(s): learning_rate"),
    ([{"lora_r": 4}, {"dp_enabled": True, "quantization": "4bit"}], "needs model.quantization='none'"),
    ([{"lora_r": 4}, {"lora_r": 4}], "sweep trials 0 (lora_r=4) and 1 (lora_r=4) train the same settings"),
    ([], "sweep is an empty list"),
    ("lora_r=4", "sweep must be an object of settings to lists of values or a list of override objects"),
]


@pytest.mark.parametrize(("bad", "says"), BAD_SWEEPS, ids=[s.split(":")[0][:40] for _, s in BAD_SWEEPS])
def test_a_bad_sweep_is_refused_in_prepare_naming_the_cause(tiny_model, bad, says):
    from loraflow import params

    form = {k: p.value for k, p in params.build_params(form=params.SWEEP_FORM).items()}  # what Airflow merges in
    run_id = f"bad-sweep-{abs(hash(json.dumps(bad)))}"
    with pytest.raises(ParamsError) as exc:
        sweep.prepare({**form, **conf("sweep-bad"), "sweep": bad}, sweep.DAG_ID, run_id, "manual", ["sweep"])
    assert says in str(exc.value)
    from loraflow.workspace import run_dir

    assert not run_dir(sweep.DAG_ID, run_id).exists()  # nothing written, nothing to clean up


def test_a_bad_trial_fails_the_dag_run_in_prepare_before_anything_trains(dag, mlflow_client):
    name = "sweep-bad-trial"
    dr = load_dag(sweep.DAG_ID).test(run_conf={**conf(name), "sweep": {"lora_r": [4, 0]}})
    states = task_states(dr)
    assert dr.state == "failed" and states["prepare"] == "failed", states
    assert states.get("trials") in ("upstream_failed", None) and states.get("register") in ("upstream_failed", None)
    assert not any(t.startswith("trial.") and s == "success" for t, s in states.items())
    assert not workspace_of(dr).exists()
    assert not mlflow_client.search_registered_models(f"name = '{name}'")
