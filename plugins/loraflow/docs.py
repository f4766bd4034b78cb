"""The DAG's documentation as its users read it in the Airflow UI (``doc_md``).

The overview is written here; the params part is rendered from the form's params, whose
descriptions are the job spec's and the pipeline settings' field descriptions.
"""

from __future__ import annotations

import json
from typing import Any

from loraflow import params

FINETUNE_DOC_MD = """\
### Fine-tune a language model with LoRA and register it in MLflow

**What it does.** Checks your dataset (columns, types, empty or duplicate rows, examples
longer than *Max sequence length*), splits it into train and eval sets, trains a LoRA
adapter on the base model (QLoRA with *Quantization* 4bit, DP-SGD with *Differential
privacy*), scores it on the held-out set, and registers it as a new version of the
MLflow model *Registered model name*. The version gets the `challenger` alias, and
`champion` too when it beats the current champion on *Promotion metric*.

**How to trigger.** Press **Trigger**: the form opens with working defaults (the bundled
sample chat data on the demo's tiny model, which trains in seconds on a CPU). For your
own run set *Dataset path* (a CSV, JSONL or Parquet file under an allowed data root),
*Data format* and *Base model* (a model directory in the model cache, or a hub id), then
adjust the LoRA and training settings; each field states its allowed range, and a value
outside it is refused before any run starts. The same params can be sent through the REST
API (`POST /api/v2/dags/loraflow_finetune/dagRuns` with `{"conf": {...}}`) or
`airflow dags trigger loraflow_finetune -c '{...}'`.

**Following a run.** The `train` task's log shows one line per step, e.g.
`step 120/1000 (12%)  loss 1.2345  lr 1.9e-4  1,850 tok/s  eta 7m40s`. A failing task
says why in its log (the data check names the row and the rule). `teardown` removes the
run's containers and scratch space whether training succeeded, failed or was stopped; it
belongs to `prepare`, so when `prepare` itself refuses the params nothing was started,
`teardown` does not run and shows *upstream_failed*: there is nothing to clean up.

**Where results go.**
- MLflow: the new model version, and its run with params, metrics, loss and learning-rate
  curves per step, the data report and sample generations (the *MLflow run* link on the
  `register` task opens it).
- **Browse > loraflow models**: every run, its versions, aliases, metrics and
  a train-loss curve.
- Files: `$LORAFLOW_HOME/runs/loraflow_finetune/<run id>/output/` holds the adapter, the
  MLflow model, `metrics.json`, `samples.jsonl` and `events.jsonl` (every progress event as
  JSON, for tools).
"""


def finetune_doc_md(form: dict[str, Any]) -> str:
    """The DAG's ``doc_md``: the overview, then every param of ``form`` (the DAG's params)."""
    return f"{FINETUNE_DOC_MD}\n{params_markdown(params.reference(form))}"


def params_markdown(rows: list[dict[str, Any]]) -> str:
    """The params section by section, each with its name (the conf key), title, default and description."""
    lines = ["**Params.** Each name below is also its key in a REST or CLI `conf`."]
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            lines += ["", f"*{section}*", ""]
        lines.append(
            f"- `{row['name']}` ({row['title']}; default `{json.dumps(row['default'])}`): {row['description']}"
        )
    return "\n".join(lines) + "\n"
