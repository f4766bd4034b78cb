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


SWEEP_DOC_MD = """\
### Sweep: train several trials of one fine-tune and register the best

**What it does.** The same form as `loraflow_finetune`, plus *Sweep*: the data is checked
and preprocessed once, then every trial trains its own LoRA adapter (one `trial.train`
and `trial.evaluate` task instance per trial, mapped, queued on the GPU pool like any
training) and is scored, with the current champion, on the same eval set. `register`
ranks the trials as the promotion gate does (a trial the gate would promote first, then
the lowest eval loss) and registers only the winner (*Register* `best`), or every trial
that finished, the winner last (`all`); the winner goes through the gate for `champion`.

**The sweep param.** A grid, every combination a trial:
`{"lora_r": [4, 8], "learning_rate": [0.0001, 0.0003]}` (4 trials), or a list of
overrides, one trial each: `[{"lora_r": 4}, {"lora_r": 16, "lora_alpha": 32}]`. Only the
form's trainer settings may vary (not *Base model*, *Data format*, *Max sequence length*
or the runtime's processes); everything else comes from the form. At most 16 trials.
Every trial is validated like a run of `loraflow_finetune` in `prepare`, before any data
is read: a bad value fails `prepare`, naming the trial and the setting. REST:
`POST /api/v2/dags/loraflow_sweep/dagRuns` with
`{"conf": {"dataset_path": "...", "sweep": {"lora_r": [4, 8]}}}`.

**Where results go.** MLflow: one parent run for the sweep, holding the sweep's table
(`sweep/trials.json`: each trial's overrides, eval loss, gate verdict, the winner), and
one child run per trial with its params and metrics; the registered trial's run holds its
model and the gate report. **Browse > loraflow models** shows the table under the run.
Files: `$LORAFLOW_HOME/runs/loraflow_sweep/<run id>/trial-<n>/output/` per trial.
"""


def sweep_doc_md(form: dict[str, Any]) -> str:
    """The sweep DAG's ``doc_md``: its overview, then every param of its form."""
    return f"{SWEEP_DOC_MD}\n{params_markdown(params.reference(form))}"


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
