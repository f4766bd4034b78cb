"""The training task: ``LoraflowTrainOperator``, a DockerOperator with a local runtime.

Runtime ``docker`` runs ``loraflow-train --job /workspace/job.json`` in the trainer image
with the run workspace and the model cache mounted, GPUs requested through
``device_requests``, labels naming the DAG run, and no network when the model is local.
Runtime ``local`` runs the same CLI as a subprocess (an argument list, never a shell) for
machines without Docker. Either way the trainer's lines stream into the task log and its
exit status becomes a task error that names the cause.

Templated fields: ``workspace`` (the run workspace path, from the prepare task's XCom),
plus DockerOperator's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import DeviceRequest, Mount
from loraflow_trainer.errors import EXIT_KILLED, EXIT_MEANINGS, EXIT_OUT_OF_MEMORY

from loraflow import config
from loraflow.errors import TrainingError
from loraflow.links import MlflowRunLink
from loraflow.workspace import Pipeline

CONTAINER_JOB = f"{config.CONTAINER_WORKSPACE}/job.json"

def explain_exit(code: int, oom_killed: bool = False) -> str:
    if code == EXIT_KILLED and oom_killed:
        return "out of memory: the container hit its memory limit and was killed (exit 137); raise memory_limit or lower per_device_train_batch_size/max_seq_length"
    if code < 0:
        return f"the trainer was killed by signal {signal.Signals(-code).name}"
    return EXIT_MEANINGS.get(code, f"the trainer exited with unexpected code {code}")

def device_requests(gpus: str) -> list[DeviceRequest] | None:
    if gpus == "none":
        return None
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=gpus.split(","), capabilities=[["gpu"]])]

def trainer_command() -> list[str]:
    """The local runtime's trainer: LORAFLOW_TRAINER_BIN, else this interpreter's environment."""
    explicit = os.environ.get("LORAFLOW_TRAINER_BIN")
    if explicit:
        return [explicit]
    beside = Path(sys.executable).parent / "loraflow-train"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("loraflow-train")
    if found:
        return [found]
    raise TrainingError("loraflow-train is not installed for the local runtime; pip install 'trainer_image[train]' or use runtime=docker")

class LoraflowTrainOperator(DockerOperator):
    template_fields = (*DockerOperator.template_fields, "workspace")
    operator_extra_links = (MlflowRunLink(),)

    def __init__(self, *, workspace: str, **kwargs: Any) -> None:
        kwargs.setdefault("image", config.image())
        kwargs.setdefault("command", ["loraflow-train", "--job", CONTAINER_JOB])
        kwargs.setdefault("docker_url", config.docker_url())
        kwargs.setdefault("auto_remove", "never")  # we inspect the exit state first, then remove
        kwargs.setdefault("mount_tmp_dir", False)
        kwargs.setdefault("tty", False)
        super().__init__(**kwargs)
        self.workspace = workspace
        self._proc: subprocess.Popen | None = None
        # What the DAG author set, kept apart from the per-run values execute() assigns:
        # the same operator object runs several DAG runs under dag.test().
        self._configured = {k: getattr(self, k) for k in ("mem_limit", "network_mode", "environment", "container_name", "user")}

    def execute(self, context) -> dict[str, Any]:
        pipeline = Pipeline.load(self.workspace)
        if pipeline.runtime == "local":
            return self._execute_local(pipeline)
        return self._execute_docker(pipeline, context)

    # -- local -----------------------------------------------------------------------

    def _execute_local(self, pipeline: Pipeline) -> dict[str, Any]:
        cmd = [*trainer_command(), "--job", str(Path(pipeline.workspace) / "job.json")]
        self.log.info("loraflow: running the trainer locally: %s", cmd)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=pipeline.workspace, start_new_session=True)
        last = ""
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            if line:
                last = line
                self.log.info("%s", line)
        code = self._proc.wait()
        if code != 0:
            raise TrainingError(f"training failed (exit {code}): {explain_exit(code)}. Last trainer line: {last[:500]}")
        return {"runtime": "local", "image": None, "image_digest": None, "exit_code": 0}

    # -- docker ----------------------------------------------------------------------

    def _execute_docker(self, pipeline: Pipeline, context) -> dict[str, Any]:
        from docker.errors import APIError, ImageNotFound

        self.configure_container(pipeline)
        try:
            digest = self.cli.inspect_image(self.image)["Id"]
        except ImageNotFound:
            raise TrainingError(f"trainer image {self.image} is not on the Docker host; build it with scripts/build-trainer-image.sh or set LORAFLOW_IMAGE") from None
        self._remove_stale_containers(pipeline.run_id)
        try:
            super().execute(context)
        except APIError as exc:
            msg = str(exc)
            if "capabilities" in msg and "gpu" in msg:
                raise TrainingError("the Docker host has no NVIDIA GPU runtime (could not select a gpu device driver); install the NVIDIA container toolkit or set gpus=none to train on CPU") from None
            raise TrainingError(f"Docker refused to run the trainer ({msg[:300]})") from None
        except Exception as exc:
            if type(exc).__name__ != "DockerContainerFailedException":
                raise
            state = self._container_state()
            code = int(state.get("ExitCode", -1))
            raise TrainingError(f"training failed (exit {code}): {explain_exit(code, bool(state.get('OOMKilled')))}") from None
        finally:
            self._remove_container()
        return {"runtime": "docker", "image": self.image, "image_digest": digest, "exit_code": 0}

    def configure_container(self, pipeline: Pipeline) -> None:
        """Mounts, GPUs, labels, user and environment of this run's trainer container."""
        ws = Path(pipeline.workspace)
        local_model = Path(pipeline.base_model_host).is_absolute()
        self.mounts = [
            Mount(target=config.CONTAINER_WORKSPACE, source=config.host_path(ws), type="bind", read_only=False),
            Mount(target=config.CONTAINER_MODELS, source=_host_models(), type="bind", read_only=True),
        ]
        self.device_requests = device_requests(pipeline.gpus)
        conf = self._configured
        self.mem_limit = pipeline.memory_limit or conf["mem_limit"]
        self.labels = {"loraflow.dag_id": pipeline.dag_id, "loraflow.run_id": pipeline.run_id}
        self.network_mode = "none" if local_model else conf["network_mode"]
        # environment and container_name are templated: the author's values as rendered.
        self.environment = {**(self.environment if conf["environment"] else {}), "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                            "HF_HOME": f"{config.CONTAINER_WORKSPACE}/.hf", **({"HF_HUB_OFFLINE": "1"} if local_model else {})}
        self.container_name = (self.container_name if conf["container_name"] else None) or f"loraflow-{ws.parent.name}-{ws.name}"[:120]
        self.user = conf["user"] or trainer_user(ws)

    def _remove_stale_containers(self, run_id: str) -> None:
        """A try killed with its worker leaves its container behind, holding the name this try needs."""
        for c in self.cli.containers(all=True, filters={"label": f"loraflow.run_id={run_id}"}):
            self.log.info("loraflow: removing container %s left by an earlier try", c["Id"][:12])
            self.cli.remove_container(c["Id"], force=True)

    def _container_state(self) -> dict[str, Any]:
        try:
            return self.cli.inspect_container(self.container["Id"])["State"]
        except Exception:  # already gone: report what we know
            return {}

    def _remove_container(self) -> None:
        container = getattr(self, "container", None)
        if container:
            try:
                self.cli.remove_container(container["Id"], force=True)
            except Exception as exc:  # teardown removes by label as a second line
                self.log.warning("loraflow: could not remove container %s: %s", container["Id"][:12], exc)

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # SIGTERM: the trainer checkpoints and exits; its process group goes with it.
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
            return
        super().on_kill()
        self._remove_container()

def trainer_user(ws: Path) -> str:
    """Who the trainer container runs as: LORAFLOW_TRAINER_USER, else Airflow's own uid:gid.

    The workspace and the model cache belong to the Airflow user, and save_pretrained
    writes weights 0600: any other uid could not read the base model or leave outputs
    the register task can read. The image's own user (uid 1000) is what docker-compose
    runs Airflow as, so there the two agree.
    """
    explicit = os.environ.get("LORAFLOW_TRAINER_USER")
    if explicit:
        return explicit
    return f"{os.geteuid()}:{os.getegid()}"


def _host_models() -> str:
    return os.environ.get("LORAFLOW_HOST_MODELS", str(config.models_dir()))

OOM_EXIT_CODES = (EXIT_OUT_OF_MEMORY, EXIT_KILLED)
