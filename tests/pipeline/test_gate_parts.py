"""The gate's decision on eval results (pure functions: no Airflow run, no MLflow)."""

from __future__ import annotations

import random

import pytest

from loraflow import evaluation, gate
from loraflow.errors import ParamsError


def ev(challenger, champion=None, ch_cases=(), champ_cases=(), status="compared"):
    def model(losses, cases):
        return {
            "losses": list(losses),
            "eval_loss": sum(losses) / len(losses),
            "behaviour": [{"id": i, "passed": p, "failures": [] if p else ["x"]} for i, p in cases],
        }

    out = {
        "n_examples": len(challenger),
        "models": {"challenger": model(challenger, ch_cases)},
        "champion": {"status": status, "version": "4" if status != "none" else None, "reason": "r"},
    }
    if champion is not None:
        out["models"]["champion"] = model(champion, champ_cases)
    return out


def noisy(n, mean, sd, seed):
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(n)]


def test_a_clear_paired_improvement_promotes_and_a_noisy_one_does_not():
    base = noisy(200, 2.0, 0.5, 1)
    better = [x - 0.2 + random.Random(i).gauss(0, 0.05) for i, x in enumerate(base)]
    d = gate.decide(ev(better, base))
    assert d.promote and d.numbers["ci_low"] > 0 and d.champion_version == "4"
    # a small mean improvement buried in per-example noise: the interval straddles zero
    rng = random.Random(7)
    coin = [x - 0.05 + rng.gauss(0, 2.0) for x in base]
    d = gate.decide(ev(coin, base))
    assert not d.promote and d.numbers["ci_low"] < 0 < d.numbers["ci_high"] and "not wholly above" in d.reason
    # a margin the improvement does not clear
    assert not gate.decide(ev(better, base), margin=0.5).promote


def test_behaviour_regressions_block_unless_allowed_and_failures_the_champion_shares_do_not():
    base = noisy(50, 2.0, 0.3, 2)
    better = [x - 0.5 for x in base]
    d = gate.decide(ev(better, base, ch_cases=[("a", False), ("b", False)], champ_cases=[("a", True), ("b", False)]))
    assert not d.promote and "a" in d.numbers["behaviour_regressions"] and "b" not in d.numbers["behaviour_regressions"]
    assert gate.decide(
        ev(better, base, ch_cases=[("a", False)], champ_cases=[("a", True)]), allow_behaviour_regressions=True
    ).promote
    assert gate.decide(ev(better, base, ch_cases=[("b", False)], champ_cases=[("b", False)])).promote


def test_privacy_policy_first_version_and_incomparable_champions():
    losses = noisy(20, 2.0, 0.3, 3)
    first = ev(losses, status="none")
    assert gate.decide(first).promote
    assert not gate.decide(first, dp_enabled=True, epsilon=8.0, max_epsilon=1.0).promote
    assert not gate.decide(first, dp_enabled=True, epsilon=None, max_epsilon=1.0).promote  # no report: no trust
    assert gate.decide(first, dp_enabled=True, epsilon=0.9, max_epsilon=1.0).promote
    assert gate.decide(first, dp_enabled=False, epsilon=None, max_epsilon=1.0).promote  # the policy is for DP runs
    d = gate.decide(ev(losses, status="not_comparable"))
    assert not d.promote and "not comparable" in d.reason and "loraflow models promote" in d.reason


def test_the_interval_is_reproducible_and_the_report_shows_the_decision():
    base = noisy(80, 2.0, 0.4, 4)
    ch = [x - 0.1 for x in noisy(80, 2.0, 0.4, 5)]
    assert gate.decide(ev(ch, base)).numbers == gate.decide(ev(ch, base)).numbers
    e = ev(ch, base)
    for m in e["models"].values():
        m.update(perplexity=7.0, generation={"exact_match": 0.0, "rouge1_f": 0.5, "rougeL_f": 0.4})
    page = gate.report_html(gate.decide(e), e, "m", "5", [3.0, 2.0, 1.5])
    assert page.count("<rect") == 80 and "<polyline" in page and "m v5" in page


def test_gate_settings_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_DATA_ROOTS", str(tmp_path))
    assert evaluation.settings({"gate_margin": 0.1, "max_epsilon": 4}) == {"gate_margin": 0.1, "max_epsilon": 4.0}
    for bad in ({"gate_margin": -1}, {"max_epsilon": 0}, {"gate_margin": float("nan")}, {"evaluate_base": "yes"}):
        with pytest.raises(ParamsError):
            evaluation.settings(bad)
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"prompt": "p"}\n')
    with pytest.raises(ParamsError, match="line 1: no check"):
        evaluation.settings({"behaviour_suite_path": str(suite)})
    with pytest.raises(ParamsError, match="outside the allowed roots"):
        evaluation.settings({"behaviour_suite_path": "/etc/passwd"})
