"""The training task: ``LoraflowTrainOperator``, a DockerOperator with a local runtime.

Runtime ``docker`` runs ``loraflow-train --job /workspace/job.json`` in the trainer image,
hardened: a non-root user, every capability dropped, ``no-new-privileges``, a read-only
root filesystem with a size-capped ``/tmp``, a pids limit, memory and shm limits from the
params, no network when the model is local, and only these mounts: the run workspace
read-only (job.json and the preprocessed dataset), its ``output/`` read-write, the model
cache read-only (and a hub cache read-write when the model comes from the hub).
Runtime ``local`` runs the same CLI as a subprocess (an argument list, never a shell) for
machines without Docker. Either way the run first leases its GPUs (``loraflow.gpus``; the
trainer is told them in ``LORAFLOW_GPUS`` and runs one process per GPU, and a multi-GPU
container gets ``/dev/shm`` of at least ``LORAFLOW_SHM_PER_GPU`` per GPU),
secrets from Airflow connections reach the trainer only through its environment
(``private_environment``), the trainer's lines stream into the task log and its exit
status becomes a task error that names the cause.

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
from docker.utils import parse_bytes
from loraflow_trainer.errors import EXIT_KILLED, EXIT_MEANINGS, EXIT_OUT_OF_MEMORY

from loraflow import config, gpus, secrets, tasks
from loraflow.errors import TrainingError
from loraflow.links import MlflowRunLink
from loraflow.workspace import Pipeline

CONTAINER_JOB = f"{config.CONTAINER_WORKSPACE}/job.json"
CONTAINER_OUTPUT = f"{config.CONTAINER_WORKSPACE}/output"
CONTAINER_HUB_CACHE = f"{config.CONTAINER_WORKSPACE}/.hf"
IMAGE_USER = "1000:1000"  # the trainer image's own user (trainer_image/Dockerfile)
TMP_SIZE = os.environ.get("LORAFLOW_CONTAINER_TMP_SIZE", "1g")
PIDS_LIMIT = int(os.environ.get("LORAFLOW_CONTAINER_PIDS_LIMIT", "4096"))


def hardening() -> dict[str, Any]:
    """Host-config settings DockerOperator has no parameter for (docker-py names)."""
    return {
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={TMP_SIZE}"},
        "pids_limit": PIDS_LIMIT,
    }

def explain_exit(code: int, oom_killed: bool = False) -> str:
    if code == EXIT_KILLED and oom_killed:
        return "out of memory: the container hit its memory limit and was killed (exit 137); raise memory_limit or lower per_device_train_batch_size/max_seq_length"
    if code < 0:
        return f"the trainer was killed by signal {signal.Signals(-code).name}"
    return EXIT_MEANINGS.get(code, f"the trainer exited with unexpected code {code}")

def device_requests(lease: gpus.GpuLease) -> list[DeviceRequest] | None:
    if lease.cpu_only:
        return None
    if lease.ids is None:
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(lease.ids), capabilities=[["gpu"]])]

SHM_PER_GPU = os.environ.get("LORAFLOW_SHM_PER_GPU", "1g")


def trainer_gpu_env(lease: gpus.GpuLease) -> dict[str, str]:
    """What the trainer needs to know of its GPUs: the leased ids (it refuses to see fewer), and the CPU stand-in."""
    env = {"LORAFLOW_GPUS": lease.visible} if lease.ids else {}
    if os.environ.get("LORAFLOW_GPUS_ON_CPU") == "1":  # hosts without a GPU driver (tests): a GPU is a gloo process
        env["LORAFLOW_GPUS_ON_CPU"] = "1"
    return env


def shm_bytes(configured: int | None, lease: gpus.GpuLease) -> int | None:
    """/dev/shm for the container: at least LORAFLOW_SHM_PER_GPU per GPU when a run spans several
    (NCCL's intra-node transport and the ranks' dataloaders live there; Docker's 64m is not enough)."""
    n = len(lease.ids or [])
    if n < 2:
        return configured
    return max(configured or 0, n * parse_bytes(SHM_PER_GPU))


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
        self._configured = {k: getattr(self, k) for k in ("mem_limit", "shm_size", "network_mode", "environment",
                                                          "_private_environment", "container_name", "user")}

    def execute(self, context) -> dict[str, Any]:
        pipeline = Pipeline.load(self.workspace)
        tasks.refuse_retrain_of_registered(pipeline, log=self.log.info)
        if pipeline.runtime == "local":
            with gpus.acquire(pipeline.gpus, log=self.log.info) as lease:
                return self._execute_local(pipeline, lease)
        return self._execute_docker(pipeline, context)

    # -- local -----------------------------------------------------------------------

    def local_command(self, pipeline: Pipeline) -> list[str]:
        """The local runtime's argument list (the evaluate operator runs another entry point)."""
        return [*trainer_command(), "--job", str(Path(pipeline.workspace) / "job.json")]

    def _execute_local(self, pipeline: Pipeline, lease: gpus.GpuLease) -> dict[str, Any]:
        cmd = self.local_command(pipeline)
        self.log.info("loraflow: running the trainer locally: %s (GPUs: %s)", cmd, lease.visible or "none")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **secrets.trainer_env()}
        if lease.ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = lease.visible
        env.update(trainer_gpu_env(lease))
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
        from docker.errors import ImageNotFound

        try:
            digest = self.cli.inspect_image(self.image)["Id"]
        except ImageNotFound:
            raise TrainingError(f"trainer image {self.image} is not on the Docker host; build it with scripts/build-trainer-image.sh or set LORAFLOW_IMAGE") from None
        self._remove_stale_containers(pipeline.run_id)
        with gpus.acquire(pipeline.gpus, busy=self._gpus_in_use, log=self.log.info) as lease:
            self.configure_container(pipeline, lease)
            self._prepare_writable_dirs(pipeline)
            return self._run_container(context, digest)

    def _run_container(self, context, digest: str) -> dict[str, Any]:
        from docker.errors import APIError

        # DockerOperator builds the host config itself and has no parameter for these.
        original = type(self.cli).create_host_config.__get__(self.cli)
        self.cli.create_host_config = lambda **kw: original(**{**kw, **hardening()})
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

    def configure_container(self, pipeline: Pipeline, lease: gpus.GpuLease) -> None:
        """Mounts, GPUs, limits, labels, user and environment of this run's trainer container."""
        ws = Path(pipeline.workspace)
        local_model = Path(pipeline.base_model_host).is_absolute()
        self.mounts = [
            Mount(target=config.CONTAINER_WORKSPACE, source=config.host_path(ws), type="bind", read_only=True),
            Mount(target=CONTAINER_OUTPUT, source=config.host_path(ws / "output"), type="bind", read_only=False),
            Mount(target=config.CONTAINER_MODELS, source=_host_models(), type="bind", read_only=True),
        ]
        if not local_model:  # hub downloads need somewhere to go that outlives a retry
            self.mounts.append(Mount(target=CONTAINER_HUB_CACHE, source=config.host_path(ws / ".hf"), type="bind", read_only=False))
        conf = self._configured
        self.mem_limit = pipeline.memory_limit or conf["mem_limit"]
        self.shm_size = shm_bytes(parse_bytes(pipeline.shm_size) if pipeline.shm_size else conf["shm_size"], lease)
        self.labels = {"loraflow.dag_id": pipeline.dag_id, "loraflow.run_id": pipeline.run_id, "loraflow.task_id": self.task_id,
                       **({gpus.LABEL: lease.visible} if lease.ids else {})}
        self.network_mode = "none" if local_model else conf["network_mode"]
        gpu_env: dict[str, str] = {}
        if gpus.request_mode() == "env":
            self.device_requests = None
            gpu_env = {"NVIDIA_VISIBLE_DEVICES": lease.visible if not lease.cpu_only else "void"}
        else:
            self.device_requests = device_requests(lease)
        # environment and container_name are templated: the author's values as rendered.
        self.environment = {**(self.environment if conf["environment"] else {}), "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                            "HOME": "/tmp", "HF_HOME": "/tmp/hf" if local_model else CONTAINER_HUB_CACHE,
                            **({"HF_HUB_OFFLINE": "1"} if local_model else {}), **gpu_env, **trainer_gpu_env(lease)}
        # Secrets: only in the container's environment, never in job.json or the rendered fields.
        self._private_environment = {**(conf["_private_environment"] or {}), **secrets.trainer_env()}
        self.container_name = (self.container_name if conf["container_name"] else None) or f"loraflow-{ws.parent.name}-{ws.name}"[:120]
        self.user = conf["user"] or trainer_user()
        if self.user.split(":")[0] in ("0", "root"):
            raise TrainingError("the trainer container must not run as root; set LORAFLOW_TRAINER_USER to a uid:gid (or unset it)")

    def _prepare_writable_dirs(self, pipeline: Pipeline) -> None:
        """Create the writable mounts, owned by the trainer's uid; check it can read the base model."""
        ws = Path(pipeline.workspace)
        uid, gid = (int(x) for x in (self.user.split(":") + [self.user])[:2]) if self.user.replace(":", "").isdigit() else (None, None)
        for d in [ws / "output"] + ([ws / ".hf"] if not Path(pipeline.base_model_host).is_absolute() else []):
            d.mkdir(parents=True, exist_ok=True)
            if uid is not None and os.geteuid() == 0:
                for path in [d, *d.rglob("*")]:
                    os.lchown(path, uid, gid)
        if uid is not None and Path(pipeline.base_model_host).is_absolute():
            unreadable = unreadable_by(Path(pipeline.base_model_host), uid, gid)
            if unreadable:
                raise TrainingError(
                    f"the trainer user {self.user} cannot read {unreadable} of the base model (mode "
                    f"{unreadable.stat().st_mode & 0o777:o}, owner uid {unreadable.stat().st_uid}); "
                    f"run chmod -R a+rX {pipeline.base_model_host} or set LORAFLOW_TRAINER_USER to its owner")

    def _gpus_in_use(self) -> set[str]:
        """GPUs held by running loraflow containers (their labels), including orphans of dead workers."""
        held: set[str] = set()
        for c in self.cli.containers(filters={"label": gpus.LABEL}):
            held.update((c.get("Labels") or {}).get(gpus.LABEL, "").split(","))
        return held - {""}

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

def trainer_user() -> str:
    """Who the trainer container runs as: never root.

    LORAFLOW_TRAINER_USER if set; else Airflow's own uid:gid when that is not root (the
    workspace and model cache belong to it, and save_pretrained writes weights 0600, so
    register can read what the trainer wrote); else, with Airflow running as root, the
    image's own user, and the writable mounts are handed to it before the start.
    """
    explicit = os.environ.get("LORAFLOW_TRAINER_USER")
    if explicit:
        return explicit
    if os.geteuid() != 0:
        return f"{os.geteuid()}:{os.getegid()}"
    return IMAGE_USER


def unreadable_by(root: Path, uid: int, gid: int) -> Path | None:
    """The first file or directory under ``root`` that ``uid:gid`` could not read, if any."""
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        need = 0o5 if path.is_dir() else 0o4
        bits = (st.st_mode >> 6) if st.st_uid == uid else (st.st_mode >> 3) if st.st_gid == gid else st.st_mode
        if bits & need != need:
            return path
    return None


def _host_models() -> str:
    return os.environ.get("LORAFLOW_HOST_MODELS", str(config.models_dir()))

OOM_EXIT_CODES = (EXIT_OUT_OF_MEMORY, EXIT_KILLED)
