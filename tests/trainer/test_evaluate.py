"""``python -m loraflow_trainer.evaluate``: real adapters of the tiny model scored on one exam."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from loraflow_trainer import behaviour
from loraflow_trainer.errors import EXIT_BAD_DATA, EXIT_MODEL_NOT_FOUND, DataError

pytestmark = pytest.mark.slow


def evaluate(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "loraflow_trainer.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _train(job_path):
    out = subprocess.run(
        [sys.executable, "-m", "loraflow_trainer", "--job", str(job_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_trained_adapter_beats_an_untrained_one_on_the_same_examples_and_the_suite_is_checked(make_job, tmp_path):
    # the "champion" is a 1-step adapter of the same base; the challenger learned the toy rule
    job_path, job = make_job(training={"max_steps": 1, "learning_rate": 1e-6})
    _train(job_path)
    shutil.copytree(tmp_path / "output" / "adapter", tmp_path / "weak-adapter")
    shutil.rmtree(tmp_path / "output")
    job_path, job = make_job(training={"max_steps": 24, "learning_rate": 1e-2})
    _train(job_path)
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "\n".join(
            json.dumps(c)
            for c in [
                {"id": "says-plus", "prompt": "What is 2 plus 3?", "must_contain": "plus"},
                {"id": "short", "prompt": "What is 1 plus 1?", "max_length": 0},
                {"id": "json", "prompt": "What is 4 plus 4?", "json_schema": {"type": "object"}},
            ]
        )
        + "\n"
    )
    out = evaluate("--job", job_path, "--champion", tmp_path / "weak-adapter", "--base", "--suite", suite)
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.loads((tmp_path / "output" / "eval.json").read_text())
    ch, champ, base = (ev["models"][k] for k in ("challenger", "champion", "base"))
    n = ev["n_examples"]
    assert n == 16 and len(ch["losses"]) == len(champ["losses"]) == len(base["losses"]) == n
    # paired: the trained adapter is better on (nearly) every one of the same examples
    wins = sum(a < b for a, b in zip(ch["losses"], champ["losses"], strict=True))
    assert wins >= n - 1 and ch["eval_loss"] < champ["eval_loss"]
    # a 1-step, lr 1e-6 adapter is the base to within noise
    assert abs(champ["eval_loss"] - base["eval_loss"]) < 0.05
    assert set(ch["generation"]) == {"exact_match", "rouge1_f", "rougeL_f"}
    assert ch["generation"]["rouge1_f"] > champ["generation"]["rouge1_f"]
    cases = {c["id"]: c for c in ch["behaviour"]}
    assert cases["says-plus"]["passed"] == ("plus" in cases["says-plus"]["output"])
    assert cases["short"]["passed"] is (cases["short"]["output"] == "")
    assert not cases["json"]["passed"] and "JSON" in cases["json"]["failures"][0]


def test_no_eval_set_and_missing_adapter_fail_with_their_cause(make_job, tmp_path):
    job_path, job = make_job()
    out = evaluate("--job", job_path)
    assert out.returncode == EXIT_MODEL_NOT_FOUND and "adapter_config.json" in out.stderr
    body = json.loads(job_path.read_text())
    body["data"]["eval_path"] = None
    job_path.write_text(json.dumps(body))
    (tmp_path / "output" / "adapter").mkdir(parents=True)
    (tmp_path / "output" / "adapter" / "adapter_config.json").write_text("{}")
    out = evaluate("--job", job_path)
    assert out.returncode == EXIT_BAD_DATA and "eval_fraction" in out.stderr


@pytest.mark.parametrize(
    "line,fragment",
    [
        ('{"prompt": "hi"}', "no check"),
        ('{"prompt": "", "must_contain": "x"}', "prompt is missing"),
        ('{"prompt": "hi", "regex": "("}', "does not compile"),
        ('{"prompt": "hi", "json_schema": {"type": 3}}', "not a valid JSON Schema"),
        ('{"prompt": "hi", "max_length": -1}', "max_length"),
        ('{"prompt": "hi", "must_contian": "x"}', "unknown key"),
        ("not json", "not JSON"),
    ],
)
def test_bad_behaviour_suite_names_the_line_and_the_fix(tmp_path, line, fragment):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"prompt": "fine", "must_contain": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match="line 2") as err:
        behaviour.load_suite(path)
    assert fragment in str(err.value)


def test_behaviour_checks_judge_outputs():
    case = behaviour.parse_case(
        {
            "prompt": "p",
            "must_contain": ["a"],
            "must_not_contain": "z",
            "regex": r"^\{",
            "json_schema": {"type": "object", "required": ["a"]},
            "max_length": 12,
        },
        "t",
        0,
    )
    assert case.check('{"a": 1}') == []
    assert len(case.check('{"b": 1}')) == 2  # no "a" substring, schema's required a
    assert any("contains 'z'" in f for f in case.check('{"a": "z"}'))
    assert any("max_length" in f for f in case.check('{"a": 1234567890}'))
