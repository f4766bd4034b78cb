"""HTML for the loraflow page: one table, server-rendered, no scripts to load.

It is shown inside the Airflow UI's iframe, so links to Airflow pages target the top
window and links to MLflow open a new tab.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from loraflow import cost
from loraflow.links import URL_PREFIX
from loraflow.ui.data import Overview, RunRow

COLUMNS = 10
WINNER = '<span class="badge winner">winner</span>'

METRICS = ("eval_loss", "perplexity", "final_train_loss", "epsilon")
TABLE_STYLE = (
    "table{border-collapse:collapse;width:100%;font-size:13px} "
    "th,td{border-bottom:1px solid #e2e8f0;padding:6px 8px;text-align:left;vertical-align:top}"
)
STYLE = (
    """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1a202c;background:#fff}
h1{font-size:20px;margin:0 0 4px} p.sub{color:#4a5568;margin:0 0 12px;font-size:13px}
"""
    + TABLE_STYLE
    + """
th{background:#f7fafc;font-weight:600} td.nowrap{white-space:nowrap} code{font-size:12px}
.badge{display:inline-block;border-radius:9px;padding:0 7px;margin-right:3px;font-size:11px;background:#e2e8f0}
svg.curve{display:block} svg.curve polyline{fill:none;stroke:#2b6cb0;stroke-width:1.5}
.champion{background:#c6f6d5;color:#22543d}.challenger{background:#feebc8;color:#7b341e}
.success{color:#2f855a}.failed{color:#c53030}.running,.queued{color:#2b6cb0}
table.sweep{width:auto;margin:2px 0 6px} table.sweep td,table.sweep th{padding:2px 8px}
.winner{background:#c6f6d5;color:#22543d}
.warn{background:#fff5f5;border:1px solid #feb2b2;padding:8px;margin-bottom:12px;border-radius:4px}
a{color:#2b6cb0;text-decoration:none} a:hover{text-decoration:underline} .muted{color:#718096}
"""
)


def render(ov: Overview, airflow_root: str = "") -> str:
    body = [
        "<h1>loraflow runs and model versions</h1>",
        f'<p class="sub">MLflow: <a href="{escape(ov.mlflow_ui)}" '
        f'target="_blank" rel="noopener">{escape(ov.mlflow_ui)}</a>'
        f" &middot; {len(ov.rows)} run{'' if len(ov.rows) == 1 else 's'}</p>",
    ]
    if ov.mlflow_error:
        body.append(f'<div class="warn">Model versions are not shown: {escape(ov.mlflow_error)}</div>')
    if not ov.rows:
        body.append('<p class="muted">No loraflow runs yet: trigger the <code>loraflow_finetune</code> DAG.</p>')
    else:
        body.append(
            "<table><thead><tr><th>DAG run</th><th>State</th><th>Started</th><th>Model</th><th>Version</th>"
            "<th>Aliases</th><th>Metrics</th><th>Train loss</th><th>Lineage</th><th>MLflow</th></tr></thead><tbody>"
        )
        body += [_row(r, airflow_root) for r in ov.rows]
        body.append("</tbody></table>")
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>loraflow</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _row(r: RunRow, airflow_root: str) -> str:
    run_link = f"{airflow_root}/dags/{quote(r.dag_id, safe='')}/runs/{quote(r.run_id, safe='')}"
    run_cell = (
        f'<a href="{escape(run_link)}" target="_top">{escape(r.run_id)}</a><br><span class="muted">{escape(r.dag_id)}'
        f"{' &middot; ' + escape(r.run_type) if r.run_type else ''}</span>"
    )
    state = f'<span class="{escape(r.state or "")}">{escape(r.state or "not in Airflow DB")}</span>'
    lead = [run_cell, state, f'<span style="white-space:nowrap">{escape(r.started or "-")}</span>']
    table = sweep_table(r.sweep, r.versions) if r.sweep else ""
    if not r.versions:
        return (
            "<tr>"
            + "".join(f"<td>{c}</td>" for c in lead)
            + f'<td>{escape(r.model_name or "-")}</td><td class="muted" colspan="6">no version registered</td></tr>'
            + table
        )
    out = []
    for i, v in enumerate(r.versions):
        cells = lead if i == 0 else ["", "", ""]
        aliases = (
            "".join(f'<span class="badge {escape(a)}">{escape(a)}</span>' for a in v["aliases"])
            or '<span class="muted">-</span>'
        )
        metrics = "<br>".join(f"{escape(k)} {v['metrics'][k]:.4g}" for k in METRICS if k in v["metrics"]) or "-"
        lin = v["lineage"]
        lineage = (
            f"data <code>{escape(lin['data_fingerprint'][:12] or '-')}</code><br>"
            f"base <code>{escape(lin['base_model'].rsplit('/', 1)[-1] or '-')}</code><br>"
            f'<span class="muted">{escape(cost.summary(v.get("tags") or {}))}</span>'
        )
        mlflow = (
            f'<a href="{escape(v["run_url"])}" target="_blank" rel="noopener">MLflow run</a>' if v["run_url"] else "-"
        )
        if v.get("gate_report"):
            mlflow += (
                f'<br><a href="{escape(report_url(v, airflow_root))}" target="_blank" rel="noopener">gate report</a>'
            )

        out.append(
            "<tr>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + f"<td>{escape(v['name'])}</td><td>v{escape(v['version'])}</td><td>{aliases}</td>"
            f"<td>{metrics}</td><td>{loss_curve(v.get('loss_curve') or [])}</td>"
            f"<td>{lineage}</td><td>{mlflow}</td></tr>"
        )
    return "".join(out) + table


def report_url(v: dict, airflow_root: str) -> str:
    """The loraflow page's route that serves a version's gate report from its MLflow run."""
    return f"{airflow_root}{URL_PREFIX}/gate-report?name={quote(v['name'], safe='')}&version={quote(v['version'])}"


def sweep_table(table: dict, versions: list[dict]) -> str:
    """A sweep's trials under its row: overrides, the gate metric on the shared eval set, the verdict, the winner."""
    metric = table.get("metric", "eval_loss")
    rows = []
    for t in table.get("trials", []):
        value = t.get(metric)
        overrides = ", ".join(f"{k}={v}" for k, v in (t.get("overrides") or {}).items()) or "the form's settings"
        verdict = f"gate: {t['gate']}" if t.get("gate") else t.get("status", "-")
        version = f"v{t['version']}" if t.get("version") else '<span class="muted">not registered</span>'
        rows.append(
            f"<tr><td>{escape(str(t.get('trial')))}</td><td><code>{escape(overrides)}</code></td>"
            f"<td>{'-' if value is None else f'{value:.4g}'}</td>"
            f'<td title="{escape(t.get("gate_reason") or "")}">{escape(verdict)}</td><td>{version}</td>'
            f"<td>{WINNER if t.get('winner') else ''}</td></tr>"
        )
    parent = table.get("parent_run_url")
    link = (
        f' &middot; <a href="{escape(parent)}" target="_blank" rel="noopener">parent MLflow run</a>' if parent else ""
    )
    return (
        f'<tr><td></td><td colspan="{COLUMNS - 1}"><b>Sweep</b> ({len(rows)} trials, ranked by the gate, then '
        f"{escape(metric)} on the same eval set){link}"
        f'<table class="sweep"><thead><tr><th>Trial</th><th>Overrides</th><th>{escape(metric)}</th><th>Gate</th>'
        f"<th>Version</th><th></th></tr></thead><tbody>{''.join(rows)}</tbody></table></td></tr>"
    )


def loss_curve(points: list[list[float]], width: int = 140, height: int = 36) -> str:
    """An inline SVG line of train loss per logging step, its first and last values beside it."""
    pts = [(float(x), float(y)) for x, y in points if y == y]  # NaN-free
    if len(pts) < 2:
        return '<span class="muted">-</span>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 2

    def sx(x):
        return pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)

    def sy(y):
        return pad + (y1 - y) / ((y1 - y0) or 1) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    label = f"train loss {ys[0]:.4g} to {ys[-1]:.4g} over {int(x1)} steps ({len(pts)} points)"
    return (
        f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}"><title>{escape(label)}</title><polyline points="{line}"/></svg>'
        f'<span class="muted">{ys[0]:.3g} &rarr; {ys[-1]:.3g}</span>'
    )
