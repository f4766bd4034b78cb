"""The evaluate task: ``LoraflowEvaluateOperator``, the train operator running the evaluate entry point.

Same arguments, runtimes, GPU pool and lease, hardened container, mounts and secrets as
``LoraflowTrainOperator``; the entry point is ``python -m loraflow_trainer.evaluate --job
job.json``. Before the trainer starts it writes the evaluate request
(``loraflow.evaluation``: the champion's adapter fetched from MLflow, the behaviour suite
copied into the workspace). It returns a summary of ``output/eval.json``; ``register``'s
gate reads the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow import evaluation
from loraflow.errors import LoraflowError
from loraflow.operators import LoraflowTrainOperator
from loraflow.runtimes import EVALUATE, Entry
from loraflow.workspace import Pipeline
from loraflow_trainer.contract import EVAL_RESULT_FILE, OUTPUT_DIR


class LoraflowEvaluateOperator(LoraflowTrainOperator):
    """Score the new adapter and the current champion on this run's eval set, in the run's runtime.

    Its arguments and templated fields (``workspace``, ``image``, ``environment``) are
    ``LoraflowTrainOperator``'s. A request that cannot be written fails the task without
    retries unless a retry can fix it (MLflow down).
    """

    entry: Entry = EVALUATE

    def execute(self, context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        pipeline = Pipeline.load(self.workspace)
        ws = Path(pipeline.workspace)
        (ws / OUTPUT_DIR / EVAL_RESULT_FILE).unlink(missing_ok=True)  # a retry never reads the last try's result
        try:
            evaluation.write_request(pipeline, log=self.log.info)
        except LoraflowError as exc:
            if exc.retryable:
                raise
            raise AirflowFailException(str(exc)) from None
        self.run_trainer(pipeline)
        result = evaluation.summary(ws)
        self.log.info("loraflow: evaluate: %s", result)
        return result
