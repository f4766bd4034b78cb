"""The evaluate task: ``LoraflowEvaluateOperator``, the train operator running the evaluate entry point.

It is ``LoraflowTrainOperator`` (same image, runtimes, GPU pool and lease, hardened
container, mounts and secrets) with another command: ``python -m
loraflow_trainer.evaluate --job /workspace/job.json``. Before the container starts it
writes the evaluate request (``loraflow.evaluation``: the champion's adapter fetched from
MLflow, the behaviour suite copied into the workspace). It returns a summary of
``output/eval.json``; ``register``'s gate reads the file itself.

Templated fields: ``workspace``, plus DockerOperator's own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from loraflow import evaluation, gpus
from loraflow.errors import LoraflowError, TrainingError
from loraflow.operators import CONTAINER_JOB, LoraflowTrainOperator, trainer_command
from loraflow.workspace import Pipeline

MODULE = "loraflow_trainer.evaluate"


def trainer_python() -> str:
    """The interpreter of the local runtime's trainer environment (beside its loraflow-train)."""
    beside = Path(trainer_command()[0]).parent / "python"
    return str(beside) if beside.exists() else sys.executable


class LoraflowEvaluateOperator(LoraflowTrainOperator):
    def __init__(self, *, workspace: str, **kwargs: Any) -> None:
        kwargs.setdefault("command", ["python", "-m", MODULE, "--job", CONTAINER_JOB])
        super().__init__(workspace=workspace, **kwargs)

    def local_command(self, pipeline: Pipeline) -> list[str]:
        return [trainer_python(), "-m", MODULE, "--job", str(Path(pipeline.workspace) / "job.json")]

    def execute(self, context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        pipeline = Pipeline.load(self.workspace)
        ws = Path(pipeline.workspace)
        (ws / "output" / "eval.json").unlink(missing_ok=True)  # a retry never reads the last try's result
        try:
            evaluation.write_request(pipeline, log=self.log.info)
        except LoraflowError as exc:
            if exc.retryable:
                raise
            raise AirflowFailException(str(exc)) from None
        try:
            if pipeline.runtime == "local":
                with gpus.acquire(pipeline.gpus, log=self.log.info) as lease:
                    self._execute_local(pipeline, lease)
            else:
                self._execute_docker(pipeline, context)
        except TrainingError as exc:
            raise TrainingError(str(exc).replace("training failed", "evaluate failed", 1)) from None
        result = evaluation.summary(ws)
        self.log.info("loraflow: evaluate: %s", result)
        return result

