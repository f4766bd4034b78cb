"""The evaluate task and the promotion gate on real parts: dag.test() on the migrated DB, the
MLflow server over HTTP, real training and evaluation of the tiny model (local runtime)."""

from __future__ import annotations

import json
import random

import pytest

from loraflow import gate, registry
from tests.conftest import write_jsonl
from tests.pipeline.conftest import conf

pytestmark = pytest.mark.slow


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def sums(n: int, seed: int, answer=None) -> list[dict]:
    """Distinct arithmetic questions; the answer is the sum unless ``answer`` says otherwise."""
    rng = random.Random(seed)
    pairs = sorted({(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n * 3)})[:n]
    rng.shuffle(pairs)
    return [chat(f"What is {a} plus {b}?", answer(a, b) if answer else f"{a} plus {b} is {a + b}.") for a, b in pairs]


def split_files(data_dir, stem: str, rows: list[dict], n_eval: int):
    train, ev = rows[n_eval:], rows[:n_eval]
    return str(write_jsonl(data_dir / f"{stem}_train.jsonl", train)), str(
        write_jsonl(data_dir / f"{stem}_eval.jsonl", ev)
    )


def aliases(client, name) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def version(client, name, v):
    return client.get_model_version(name, v)


def recorded(client, name, v, metric="eval_loss") -> float:
    return client.get_run(version(client, name, v).run_id).data.metrics[metric]


def test_gate_follows_the_same_exam_where_the_recorded_numbers_say_otherwise(run_dag, mlflow_client, data_dir):
    name = "gate-same-exam"
    # v1 learns an easy exam: every answer is "ok." Its own eval loss ends up near zero.
    easy_train, easy_eval = split_files(data_dir, "easy", sums(60, seed=1, answer=lambda a, b: "ok."), 12)
    state, tis, _ = run_dag(conf(name, dataset_path=easy_train, eval_dataset_path=easy_eval))
    assert state == "success", tis
    assert aliases(mlflow_client, name) == {"champion": "1", "challenger": "1"}

    # v2 learns the real task (sums). Its eval set is harder, so its recorded eval loss is higher.
    hard_train, hard_eval = split_files(data_dir, "hard", sums(120, seed=2), 16)
    state, tis, ws = run_dag(conf(name, dataset_path=hard_train, eval_dataset_path=hard_eval))
    assert state == "success", tis
    assert tis["evaluate"] == "success"
    v1_recorded, v2_recorded = recorded(mlflow_client, name, "1"), recorded(mlflow_client, name, "2")
    # The old logic compared these two numbers, measured on different exams: it keeps v1.
    assert v2_recorded > v1_recorded and not registry.better(v2_recorded, v1_recorded, "eval_loss")

    # On the same exam (v2's eval set, both adapters in one process) v2 is better, and the gate says so.
    ev = json.loads((ws / "output" / "eval.json").read_text())
    assert ev["champion"]["status"] == "compared" and ev["champion"]["version"] == "1"
    assert ev["models"]["challenger"]["eval_loss"] < ev["models"]["champion"]["eval_loss"]
    assert (
        len(ev["models"]["challenger"]["losses"]) == len(ev["models"]["champion"]["losses"]) == ev["n_examples"] == 16
    )
    assert aliases(mlflow_client, name) == {"champion": "2", "challenger": "2"}
    tags = version(mlflow_client, name, "2").tags
    assert tags[gate.TAG_DECISION] == "promote" and tags[gate.TAG_CHAMPION] == "1"
    numbers = json.loads(tags[gate.TAG_NUMBERS])
    assert numbers["ci_low"] > numbers["margin"] == 0.0
    assert "same 16 examples" in tags[registry.PROMOTION_REASON]
    # the report and the raw scores are artifacts of v2's MLflow run
    run_id = version(mlflow_client, name, "2").run_id
    assert {a.path for a in mlflow_client.list_artifacts(run_id, "evaluation")} == {
        "evaluation/eval.json",
        gate.REPORT_ARTIFACT,
    }
    report = mlflow_client.download_artifacts(run_id, gate.REPORT_ARTIFACT)
    html = open(report).read()
    assert "promoted to champion" in html and "<svg" in html
    # both moves are in the alias history, with the register task that made them
    from loraflow.registry import aliases as alias_log

    log = alias_log.moves(mlflow_client, name)
    champ = [m for m in log if m["alias"] == "champion"]
    assert [(m["from"], m["to"]) for m in champ] == [(None, "1"), ("1", "2")]
    assert champ[1]["by"].startswith("register of loraflow_finetune/") and "same 16 examples" in champ[1]["reason"]


def test_better_loss_but_a_failed_behaviour_case_stays_challenger(run_dag, mlflow_client, data_dir):
    name = "gate-behaviour"
    suite = data_dir / "suite_no_banana.jsonl"
    suite.write_text(
        json.dumps({"id": "no-banana", "prompt": "What is 2 plus 2?", "must_not_contain": "banana"}) + "\n"
    )
    # v1: one tiny step, practically the base model, which never says "banana"
    state, tis, _ = run_dag(conf(name, max_steps=1, learning_rate=1e-5, behaviour_suite_path=str(suite)))
    assert state == "success", tis
    assert aliases(mlflow_client, name)["champion"] == "1"
    # v2 learns to answer everything with bananas: far lower loss on its exam, and it fails the case
    b_train, b_eval = split_files(data_dir, "banana", sums(60, seed=3, answer=lambda a, b: "banana banana."), 12)
    state, tis, ws = run_dag(
        conf(name, dataset_path=b_train, eval_dataset_path=b_eval, behaviour_suite_path=str(suite))
    )
    assert state == "success", tis
    ev = json.loads((ws / "output" / "eval.json").read_text())
    ch, champ = ev["models"]["challenger"], ev["models"]["champion"]
    assert ch["eval_loss"] < champ["eval_loss"]
    assert [c["passed"] for c in champ["behaviour"]] == [True] and [c["passed"] for c in ch["behaviour"]] == [False]
    assert "banana" in ch["behaviour"][0]["output"]
    assert aliases(mlflow_client, name) == {"champion": "1", "challenger": "2"}
    tags = version(mlflow_client, name, "2").tags
    assert tags[gate.TAG_DECISION] == "keep"
    assert "no-banana" in tags[gate.TAG_REASON] and "behaviour" in tags[gate.TAG_REASON]
    assert json.loads(tags[gate.TAG_NUMBERS])["ci_low"] > 0  # the loss alone would have promoted it
    assert "no-banana" in tags[registry.ALIAS_NOTE]


def test_dp_run_over_max_epsilon_is_never_champion(run_dag, mlflow_client):
    name = "gate-dp-policy"
    state, tis, ws = run_dag(conf(name, dp_enabled=True, dp_target_epsilon=8.0, max_epsilon=1.0, max_steps=4))
    assert state == "success", tis
    epsilon = json.loads((ws / "output" / "metrics.json").read_text())["epsilon"]
    assert epsilon > 1.0
    # even as the model's first version, where anything else becomes champion
    assert aliases(mlflow_client, name) == {"challenger": "1"}
    tags = version(mlflow_client, name, "1").tags
    assert tags[gate.TAG_DECISION] == "keep" and "max_epsilon 1" in tags[gate.TAG_REASON]
    assert "no champion set" in tags[registry.ALIAS_NOTE]


def test_bad_behaviour_suite_is_refused_before_any_training(run_dag, mlflow_client, data_dir):
    bad = data_dir / "suite_bad.jsonl"
    bad.write_text('{"prompt": "hi", "regex": "("}\n')
    state, tis, _ = run_dag(conf("gate-bad-suite", behaviour_suite_path=str(bad)))
    assert state == "failed" and tis["prepare"] == "failed" and tis["train"] in ("upstream_failed", None)
    assert not mlflow_client.search_registered_models("name = 'gate-bad-suite'")
