"""The training task: ``LoraflowTrainOperator``, a thin operator that hands the trainer to a runtime.

The operator reads the run's settings from its workspace (``pipeline.json``), refuses to
retrain a run that is already registered, and runs the trainer entry point in the run's
runtime (``loraflow.runtimes``): ``docker`` (the hardened trainer container) or ``local``
(a subprocess). The runtime leases the GPUs, streams the trainer's lines into the task log
and turns a non-zero exit into ``TrainerFailed``, which names the exit code and its cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from loraflow import config, tasks
from loraflow.errors import TrainingError
from loraflow.links import MlflowRunLink
from loraflow.runtimes import TRAIN, Entry, Runtime, TrainerFailed, TrainerRun
from loraflow.runtimes.docker import API_TIMEOUT_S, DockerRuntime, DockerSettings
from loraflow.runtimes.local import LocalRuntime
from loraflow.workspace import Pipeline


class LoraflowTrainOperator(BaseOperator):
    """Run ``loraflow-train --job job.json`` on a prepared run workspace, in the run's runtime.

    The runtime is the run's ``runtime`` param (``pipeline.json``), not an operator argument:
    one DAG trains in Docker on a GPU worker and locally on a laptop. The memory and
    ``/dev/shm`` limits come from the run's ``memory_limit``/``shm_size`` params first; the
    arguments below are the deployment's defaults for what a run leaves empty.

    :param workspace: the run workspace, ``<LORAFLOW_HOME>/runs/<dag>/<run>`` (the prepare
        task's return value). (templated)
    :param image: the trainer image, runtime docker; default ``LORAFLOW_IMAGE``. (templated)
    :param environment: extra environment variables for the trainer, in either runtime;
        shown in the rendered fields, so never secrets (those come from Airflow connections,
        ``loraflow.secrets``). (templated)
    :param docker_url: the Docker engine, runtime docker; default ``LORAFLOW_DOCKER_URL``,
        else ``DOCKER_HOST``, else the local socket.
    :param network_mode: the container's network when the base model comes from the hub,
        runtime docker (a model in the cache always gets ``none``); default Docker's bridge.
    :param mem_limit: the container's memory limit (``16g``) for runs whose ``memory_limit``
        param is empty, runtime docker; default none.
    :param shm_size: ``/dev/shm`` (``2g``) for runs whose ``shm_size`` param is empty,
        runtime docker; a multi-GPU run gets at least ``LORAFLOW_SHM_PER_GPU`` per GPU.
    :param user: ``uid:gid`` of the trainer container, never root, runtime docker; default
        ``LORAFLOW_TRAINER_USER``, else Airflow's own uid:gid, else the image's user.
    :param api_timeout: seconds for one Docker API call, runtime docker (the wait for the
        trainer to finish has none).
    """

    template_fields: Sequence[str] = ("workspace", "image", "environment")
    operator_extra_links = (MlflowRunLink(),)
    entry: Entry = TRAIN

    def __init__(
        self,
        *,
        workspace: str,
        image: str | None = None,
        environment: dict[str, str] | None = None,
        docker_url: str | None = None,
        network_mode: str | None = None,
        mem_limit: str | None = None,
        shm_size: str | None = None,
        user: str | None = None,
        api_timeout: int = API_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace
        self.image = image or config.image()
        self.environment = environment or {}
        self.docker_url = docker_url or config.docker_url()
        self.network_mode = network_mode
        self.mem_limit = mem_limit
        self.shm_size = shm_size
        self.user = user
        self.api_timeout = api_timeout
        self._running: Runtime | None = None  # the runtime of the execute() in progress, for on_kill

    def execute(self, context) -> dict[str, Any]:
        pipeline = Pipeline.load(self.workspace)
        tasks.refuse_retrain_of_registered(pipeline, log=self.log.info)
        return self.run_trainer(pipeline)

    def run_trainer(self, pipeline: Pipeline) -> dict[str, Any]:
        """Run this operator's entry point in the run's runtime; the provenance register records.

        A failure a retry cannot fix (``TrainerFailed.retry_helps`` false, or the runtime
        refusing the run: no image, no GPU runtime) fails the task without its retries; an
        interruption raises as it is, and the task's retries (``LORAFLOW_TRAIN_RETRIES``)
        resume from the newest checkpoint, on any worker.
        """
        runtime = self.runtime(pipeline.runtime)
        self._running = runtime
        try:
            return runtime.run(TrainerRun(pipeline, self.entry, self.task_id, dict(self.environment)), self.log.info)
        except TrainerFailed as exc:
            if exc.retry_helps:
                raise
            raise AirflowFailException(str(exc)) from exc
        except TrainingError as exc:
            raise AirflowFailException(str(exc)) from exc
        finally:
            self._running = None

    def runtime(self, name: str) -> Runtime:
        if name == "local":
            return LocalRuntime()
        if name == "docker":
            return DockerRuntime(
                DockerSettings(
                    image=self.image,
                    docker_url=self.docker_url,
                    network_mode=self.network_mode,
                    mem_limit=self.mem_limit,
                    shm_size=self.shm_size,
                    user=self.user,
                    api_timeout=self.api_timeout,
                )
            )
        raise TrainingError(f"runtime {name!r} is not local or docker; set the runtime param or LORAFLOW_RUNTIME")

    def on_kill(self) -> None:
        if self._running is not None:
            self._running.stop()
