"""The promotion gate: may this run's adapter become ``champion``, and why (or why not).

It decides from ``eval.json``, which the ``evaluate`` task wrote after scoring this run's
adapter (the challenger) and the current champion on the *same* held-out examples. The
challenger is promoted only if all of these hold:

1. **privacy** (DP runs): its reported epsilon is within ``max_epsilon``, when set; a DP
   run over the policy is never champion, not even as a model's first version;
2. **same exam**: the champion was comparable (same base model) and the paired bootstrap
   confidence interval of the mean per-example loss difference (champion minus
   challenger, so positive means the challenger is better) lies wholly above
   ``gate_margin``;
3. **behaviour**: it fails no behaviour case the champion passes (unless
   ``allow_behaviour_regressions``).

A model's first version (no champion yet) passes 2 and 3 by default. The decision holds
the numbers behind it, for the version's tags and the report (``report_html``).
Pure functions of plain values: numpy/scipy only, no MLflow, no torch.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow_trainer import contract

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0  # the same eval results always give the same interval

# Version tags the decision is recorded in.
TAG_DECISION = "loraflow.gate.decision"  # promote | keep
TAG_REASON = "loraflow.gate.reason"
TAG_CHAMPION = "loraflow.gate.compared_with"  # the champion version evaluate scored
TAG_NUMBERS = "loraflow.gate.numbers"  # JSON of Decision.numbers
REPORT_ARTIFACT = "evaluation/gate_report.html"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None  # the champion it was compared with (None: there was none)
    numbers: dict[str, Any] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        return {
            TAG_DECISION: "promote" if self.promote else "keep",
            TAG_REASON: self.reason[:4900],
            TAG_CHAMPION: self.champion_version or "",
            TAG_NUMBERS: json.dumps(self.numbers, default=str)[:4900],
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    diffs: list[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Confidence interval of the mean of paired differences (scipy's BCa bootstrap; percentile if BCa is undefined)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2 or float(d.std()) == 0.0:
        return float(d.mean()), float(d.mean())  # no spread: the mean is the interval
    for method in ("BCa", "percentile"):
        res = stats.bootstrap(
            (d,),
            np.mean,
            confidence_level=confidence,
            n_resamples=resamples,
            method=method,
            random_state=np.random.default_rng(seed),
            vectorized=True,
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return float(d.mean()), float(d.mean())


def behaviour_regressions(ev: dict[str, Any]) -> list[str]:
    """Ids of cases the champion passes and the challenger fails."""
    models = ev.get("models", {})
    if "champion" not in models:
        return []
    champ = {c["id"]: c["passed"] for c in models["champion"].get("behaviour", [])}
    return [c["id"] for c in models["challenger"].get("behaviour", []) if not c["passed"] and champ.get(c["id"])]


def decide(
    ev: dict[str, Any],
    *,
    margin: float = 0.0,
    max_epsilon: float | None = None,
    dp_enabled: bool = False,
    epsilon: float | None = None,
    allow_behaviour_regressions: bool = False,
    confidence: float = CONFIDENCE,
) -> Decision:
    """The gate's decision on ``eval.json``'s content (see the module docstring)."""
    champion = ev.get("champion") or {"status": "none"}
    status, version = champion.get("status", "none"), champion.get("version")
    ch = ev["models"]["challenger"]
    failed = [c["id"] for c in ch.get("behaviour", []) if not c["passed"]]
    numbers: dict[str, Any] = {
        "n_examples": ev.get("n_examples"),
        "challenger_eval_loss": ch.get("eval_loss"),
        "margin": margin,
        "confidence": confidence,
        "champion_status": status,
        "behaviour_cases": ev.get("n_behaviour_cases", 0),
        "challenger_failed_cases": failed,
    }
    if dp_enabled:
        numbers.update(epsilon=epsilon, max_epsilon=max_epsilon)
        if max_epsilon is not None and (epsilon is None or not epsilon <= max_epsilon):
            got = "no epsilon was reported" if epsilon is None else f"epsilon {epsilon:.4g}"
            return Decision(
                False,
                f"privacy policy: {got} exceeds max_epsilon {max_epsilon:g}; "
                "a DP run over the policy is never champion",
                version,
                numbers,
            )
    if status == "none":
        return Decision(True, "first version: no champion to compare with", None, numbers)
    if status == "self":
        return Decision(True, "this run's version is already the champion", version, numbers)
    if status != "compared":
        return Decision(
            False,
            f"champion v{version} is not comparable ({champion.get('reason', 'unknown')}); "
            f"promote by hand with `loraflow models promote` if it should replace it",
            version,
            numbers,
        )
    theirs = ev["models"]["champion"]
    diffs = [c - o for c, o in zip(theirs["losses"], ch["losses"], strict=True)]
    low, high = paired_bootstrap(diffs, confidence)
    mean = sum(diffs) / len(diffs)
    regressions = behaviour_regressions(ev)
    numbers.update(
        champion_eval_loss=theirs.get("eval_loss"),
        mean_loss_improvement=mean,
        ci_low=low,
        ci_high=high,
        challenger_wins=sum(d > 0 for d in diffs),
        behaviour_regressions=regressions,
    )
    ci = (
        f"{mean:+.4g} (95% CI {low:+.4g} .. {high:+.4g})"
        if confidence == 0.95
        else f"{mean:+.4g} ({confidence:.0%} CI {low:+.4g} .. {high:+.4g})"
    )
    on = f"per-example eval loss improvement over v{version} on the same {len(diffs)} examples: {ci}"
    if not low > margin:
        return Decision(False, f"{on} is not wholly above the margin {margin:g}", version, numbers)
    if regressions and not allow_behaviour_regressions:
        return Decision(
            False, f"{on}, but it fails behaviour case(s) v{version} passes: {', '.join(regressions)}", version, numbers
        )
    return Decision(
        True,
        f"{on}, above the margin {margin:g}"
        + (f"; behaviour regressions allowed: {', '.join(regressions)}" if regressions else ""),
        version,
        numbers,
    )


def from_workspace(
    ws: Path, *, margin: float, max_epsilon: float | None, dp_enabled: bool, allow_behaviour_regressions: bool = False
) -> Decision | None:
    """The decision for a run workspace (None when evaluate wrote no eval.json)."""
    path = Path(ws) / "output" / "eval.json"
    if not path.exists():
        return None
    ev = json.loads(path.read_text())
    metrics_path = Path(ws) / contract.OUTPUT_DIR / contract.METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    epsilon = metrics.get("epsilon")
    return decide(
        ev,
        margin=margin,
        max_epsilon=max_epsilon,
        dp_enabled=dp_enabled,
        epsilon=float(epsilon) if epsilon is not None else None,
        allow_behaviour_regressions=allow_behaviour_regressions,
    )


# -- report ------------------------------------------------------------------------------


def _svg_differences(diffs: list[float], width: int = 640, height: int = 220) -> str:
    """Per-example loss differences, sorted, as bars around zero (green: challenger better)."""
    if not diffs:
        return "<p>No champion was compared, so there are no per-example differences.</p>"
    d = sorted(diffs)
    top = max(max(abs(x) for x in d), 1e-9)
    mid, bar = height / 2, width / len(d)
    bars = []
    for i, x in enumerate(d):
        h = abs(x) / top * (mid - 10)
        y = mid - h if x > 0 else mid
        colour = "#2e7d32" if x > 0 else "#c62828"
        bars.append(
            f'<rect x="{i * bar:.2f}" y="{y:.2f}" width="{max(bar - 0.5, 0.5):.2f}" height="{h:.2f}" fill="{colour}"/>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="per-example loss differences">'
        f'<line x1="0" y1="{mid}" x2="{width}" y2="{mid}" stroke="#555"/>{"".join(bars)}'
        f'<text x="4" y="14" font-size="12">+{top:.3g} (challenger better)</text>'
        f'<text x="4" y="{height - 4}" font-size="12">-{top:.3g} (champion better)</text></svg>'
    )


def _svg_curve(losses: list[float], width: int = 640, height: int = 160) -> str:
    if len(losses) < 2:
        return ""
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pts = " ".join(
        f"{i / (len(losses) - 1) * (width - 20) + 10:.1f},{height - 10 - (v - lo) / span * (height - 30):.1f}"
        for i, v in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="training loss">'
        f'<polyline points="{pts}" fill="none" stroke="#1565c0" stroke-width="1.5"/>'
        f'<text x="4" y="14" font-size="12">{hi:.3g}</text>'
        f'<text x="4" y="{height - 2}" font-size="12">{lo:.3g}</text></svg>'
    )


def report_html(
    decision: Decision, ev: dict[str, Any], name: str, version: str, train_losses: list[float] | None = None
) -> str:
    """A short self-contained HTML page: the decision, its numbers, per-model scores, the plots."""
    e = html.escape
    models = ev.get("models", {})
    diffs = []
    if "champion" in models:
        diffs = [c - o for c, o in zip(models["champion"]["losses"], models["challenger"]["losses"], strict=True)]
    rows = []
    for label, m in models.items():
        gen = m.get("generation", {})
        passed = sum(c["passed"] for c in m.get("behaviour", []))
        rows.append(
            f"<tr><td>{e(label)}</td><td>{m['eval_loss']:.4f}</td><td>{m['perplexity']:.3f}</td>"
            + "".join(
                f"<td>{gen[k]:.3f}</td>" if k in gen else "<td>-</td>" for k in ("exact_match", "rouge1_f", "rougeL_f")
            )
            + f"<td>{passed}/{len(m.get('behaviour', []))}</td></tr>"
        )
    cases = []
    for c in models.get("challenger", {}).get("behaviour", []):
        theirs = next((x for x in models.get("champion", {}).get("behaviour", []) if x["id"] == c["id"]), None)
        cases.append(
            f"<tr><td>{e(c['id'])}</td><td>{'pass' if c['passed'] else 'FAIL: ' + e('; '.join(c['failures']))}</td>"
            f"<td>{'-' if theirs is None else ('pass' if theirs['passed'] else 'fail')}</td></tr>"
        )
    numbers = "".join(
        f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(v, default=str))}</td></tr>" for k, v in decision.numbers.items()
    )
    curve = _svg_curve(train_losses or [])
    style = (
        "body{font-family:sans-serif;max-width:720px;margin:1em auto}td,th{padding:2px 8px;text-align:left}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}"
    )
    n_examples, n_generations = ev.get("n_examples"), ev.get("n_generation_examples")
    score_head = (
        "<tr><th>model</th><th>eval loss</th><th>perplexity</th><th>exact match</th>"
        "<th>ROUGE-1 F</th><th>ROUGE-L F</th><th>behaviour</th></tr>"
    )
    behaviour = (
        "<table><tr><th>case</th><th>challenger</th><th>champion</th></tr>" + "".join(cases) + "</table>"
        if cases
        else "<p>No behaviour suite was given.</p>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Gate: {e(name)} v{e(version)}</title>
<style>{style}</style>
</head><body>
<h1>{e(name)} v{e(version)}: {"promoted to champion" if decision.promote else "not promoted"}</h1>
<p><b>Why:</b> {e(decision.reason)}</p>
<h2>Scores on this run's eval set ({n_examples} examples, {n_generations} generations, greedy)</h2>
<table>{score_head}{"".join(rows)}</table>
<h2>Per-example loss difference (champion minus challenger, sorted)</h2>
{_svg_differences(diffs)}
{"<h2>Training loss</h2>" + curve if curve else ""}
<h2>Behaviour cases</h2>
{behaviour}
<h2>Numbers</h2><table>{numbers}</table>
</body></html>
"""
