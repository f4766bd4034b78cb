"""The ``docker`` runtime: the trainer in a hardened container of the trainer image.

Everything loraflow asks of Docker is here:

- **mounts**: the run workspace read-only (job.json and the preprocessed data), its
  ``output/`` read-write, the model cache read-only at ``/models`` (``model_path`` is how
  prepare names a cached base model for the trainer), and a hub cache read-write in the
  workspace only when the model comes from the hub; nothing else of the host.
- **hardening**: every capability dropped, ``no-new-privileges``, a read-only root
  filesystem with a size-capped ``/tmp`` (``LORAFLOW_CONTAINER_TMP_SIZE``, 1g), a pids limit
  (``LORAFLOW_CONTAINER_PIDS_LIMIT``, 4096), memory and ``/dev/shm`` limits from the run's
  params (at least ``LORAFLOW_SHM_PER_GPU`` per GPU for a multi-GPU run), no network for a
  local model, and a non-root user (``trainer_user``), to whom the writable mounts belong.
- **GPUs**: the lease's ids as a device request (``--gpus``), or as
  ``NVIDIA_VISIBLE_DEVICES`` where ``LORAFLOW_GPU_REQUEST=env``; a container's
  ``loraflow.gpu`` label marks its GPUs busy for other runs, even after its worker died.
- **labels** ``loraflow.dag_id``, ``loraflow.run_id``, ``loraflow.task_id``: a try stops
  (SIGTERM, so it checkpoints) and removes what an earlier try on its workspace left (the
  container name is the workspace's: ``remove_earlier_try``), and teardown removes every
  container of the run (``remove_containers``).
- **secrets** (the hub token) only in the container's environment, never in a rendered
  field or a file.

The engine is reached through the docker provider's ``DockerHook``. The container is
created here rather than by ``DockerOperator``, which has no parameter for the hardening
settings; a non-zero exit raises ``ContainerFailed``, both loraflow's ``TrainerFailed`` and
the provider's ``DockerContainerFailedException``, with the exit code (137 with
``OOMKilled`` reads as out of memory) and the trainer's last line.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.hooks.docker import DockerHook
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import DeviceRequest, Mount
from docker.utils import parse_bytes

from loraflow import config, gpus, secrets
from loraflow.errors import TrainingError
from loraflow.runtimes import STOP_TIMEOUT_S, STREAMING_ENV, Entry, TrainerFailed, TrainerRun, trainer_gpu_env
from loraflow_trainer.contract import JOB_FILE, OUTPUT_DIR

if TYPE_CHECKING:
    from docker import APIClient

    from loraflow.workspace import Pipeline

CONTAINER_JOB = f"{config.CONTAINER_WORKSPACE}/{JOB_FILE}"
CONTAINER_OUTPUT = f"{config.CONTAINER_WORKSPACE}/{OUTPUT_DIR}"
HUB_CACHE_DIR = ".hf"  # in the workspace: hub downloads outlive a retry
CONTAINER_HUB_CACHE = f"{config.CONTAINER_WORKSPACE}/{HUB_CACHE_DIR}"
IMAGE_USER = "1000:1000"  # the trainer image's own user (trainer_image/Dockerfile)
API_TIMEOUT_S = 60

LABEL_DAG_ID = "loraflow.dag_id"
LABEL_RUN_ID = "loraflow.run_id"
LABEL_TASK_ID = "loraflow.task_id"


class ContainerFailed(TrainerFailed, DockerContainerFailedException):
    """The trainer container exited non-zero (``logs``: its last line, as the provider's exception carries them)."""

    def __init__(self, entry: Entry, exit_code: int, *, oom_killed: bool = False, last_line: str = "") -> None:
        super().__init__(entry, exit_code, oom_killed=oom_killed, last_line=last_line)
        self.logs = [last_line] if last_line else []


@dataclass(frozen=True)
class DockerSettings:
    """What the DAG author sets for the docker runtime (``LoraflowTrainOperator``'s arguments)."""

    image: str
    docker_url: str
    network_mode: str | None = None  # for a hub model; a local model gets "none"
    mem_limit: str | None = None  # when the run's memory_limit param is empty
    shm_size: str | None = None  # when the run's shm_size param is empty
    user: str | None = None  # uid:gid, never root; default trainer_user()
    api_timeout: int = API_TIMEOUT_S


@dataclass(frozen=True)
class ContainerSpec:
    """One trainer container, as Docker is asked to create it."""

    image: str
    name: str
    command: list[str]
    user: str
    environment: dict[str, str]
    labels: dict[str, str]
    mounts: list[Mount]
    network_mode: str | None
    mem_limit: str | None
    shm_size: int | None
    device_requests: list[DeviceRequest] | None
    private_environment: dict[str, str] = field(default_factory=dict, repr=False)  # secrets: never logged

    def host_config(self) -> dict[str, Any]:
        """Keyword arguments of docker-py's ``create_host_config``."""
        return {
            "mounts": self.mounts,
            "network_mode": self.network_mode,
            "mem_limit": self.mem_limit,
            "shm_size": self.shm_size,
            "device_requests": self.device_requests,
            "auto_remove": False,
            **hardening(),
        }


def pids_limit() -> int:
    return int(os.environ.get("LORAFLOW_CONTAINER_PIDS_LIMIT", "4096"))


def hardening() -> dict[str, Any]:
    """The host-config settings that confine the trainer (docker-py names)."""
    tmp_size = os.environ.get("LORAFLOW_CONTAINER_TMP_SIZE", "1g")
    return {
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={tmp_size}"},
        "pids_limit": pids_limit(),
    }


def host_models() -> str:
    """The model cache as the engine sees it (LORAFLOW_HOST_MODELS when Airflow itself runs in a container)."""
    return os.environ.get("LORAFLOW_HOST_MODELS", str(config.models_dir()))


def model_path(host_path: str) -> str:
    """A base model dir of the model cache as the container sees it, under /models (a hub id as is)."""
    if not Path(host_path).is_absolute():
        return host_path
    return f"{config.CONTAINER_MODELS}/{Path(host_path).relative_to(config.models_dir())}"


def device_requests(lease: gpus.GpuLease) -> list[DeviceRequest] | None:
    if lease.cpu_only:
        return None
    if lease.ids is None:
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(lease.ids), capabilities=[["gpu"]])]


def shm_bytes(configured: int | None, lease: gpus.GpuLease) -> int | None:
    """/dev/shm for the container: at least LORAFLOW_SHM_PER_GPU per GPU when a run spans several
    (NCCL's intra-node transport and the ranks' dataloaders live there; Docker's 64m is not enough)."""
    n = len(lease.ids or [])
    if n < 2:
        return configured
    return max(configured or 0, n * parse_bytes(os.environ.get("LORAFLOW_SHM_PER_GPU", "1g")))


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


NAME_MAX = 120  # container names stay readable in `docker ps`


def container_name(pipeline: Pipeline) -> str:
    """The trainer container's name: its workspace's (one run, or one trial of a sweep)."""
    ws = Path(pipeline.workspace)
    name = f"loraflow-{ws.parent.name}-{ws.name}"
    if len(name) <= NAME_MAX:
        return name
    # Cut, the readable part keeps its head and a digest of the whole tells long ids (and trials) apart.
    return f"{name[: NAME_MAX - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def container_spec(run: TrainerRun, settings: DockerSettings, lease: gpus.GpuLease) -> ContainerSpec:
    """Mounts, GPUs, limits, labels, user and environment of one run's trainer container."""
    pipeline = run.pipeline
    ws = Path(pipeline.workspace)
    local_model = Path(pipeline.base_model_host).is_absolute()
    mounts = [
        Mount(target=config.CONTAINER_WORKSPACE, source=config.host_path(ws), type="bind", read_only=True),
        Mount(target=CONTAINER_OUTPUT, source=config.host_path(ws / OUTPUT_DIR), type="bind", read_only=False),
        Mount(target=config.CONTAINER_MODELS, source=host_models(), type="bind", read_only=True),
    ]
    if not local_model:
        mounts.append(
            Mount(target=CONTAINER_HUB_CACHE, source=config.host_path(ws / HUB_CACHE_DIR), type="bind", read_only=False)
        )
    gpu_env: dict[str, str] = {}
    requests = device_requests(lease)
    if gpus.request_mode() == "env":
        requests = None
        gpu_env = {"NVIDIA_VISIBLE_DEVICES": lease.visible if not lease.cpu_only else "void"}
    user = settings.user or trainer_user()
    if user.split(":")[0] in ("0", "root"):
        raise TrainingError(
            "the trainer container must not run as root; set LORAFLOW_TRAINER_USER to a uid:gid (or unset it)"
        )
    shm_size = pipeline.shm_size or settings.shm_size
    command = [run.entry.script] if run.entry.script else ["python", "-m", str(run.entry.module)]
    return ContainerSpec(
        image=settings.image,
        name=container_name(pipeline),
        command=[*command, "--job", CONTAINER_JOB],
        user=user,
        environment={
            **run.environment,
            **STREAMING_ENV,
            "HOME": "/tmp",
            "HF_HOME": "/tmp/hf" if local_model else CONTAINER_HUB_CACHE,
            **({"HF_HUB_OFFLINE": "1"} if local_model else {}),
            **gpu_env,
            **trainer_gpu_env(lease),
        },
        labels={
            LABEL_DAG_ID: pipeline.dag_id,
            LABEL_RUN_ID: pipeline.run_id,
            LABEL_TASK_ID: run.task_id,
            **({gpus.LABEL: lease.visible} if lease.ids else {}),
        },
        mounts=mounts,
        network_mode="none" if local_model else settings.network_mode,
        mem_limit=pipeline.memory_limit or settings.mem_limit,
        shm_size=shm_bytes(parse_bytes(shm_size) if shm_size else None, lease),
        device_requests=requests,
        private_environment=secrets.trainer_env(),
    )


def prepare_writable_dirs(pipeline: Pipeline, user: str) -> None:
    """Create the writable mounts, owned by the trainer's uid; check it can read the base model."""
    ws = Path(pipeline.workspace)
    local_model = Path(pipeline.base_model_host).is_absolute()
    numeric = user.replace(":", "").isdigit()
    uid, gid = (int(x) for x in (user.split(":") + [user])[:2]) if numeric else (None, None)
    for d in [ws / OUTPUT_DIR] + ([] if local_model else [ws / HUB_CACHE_DIR]):
        d.mkdir(parents=True, exist_ok=True)
        if uid is not None and os.geteuid() == 0:
            for path in [d, *d.rglob("*")]:
                os.lchown(path, uid, gid)
    if uid is not None and local_model:
        unreadable = unreadable_by(Path(pipeline.base_model_host), uid, gid)
        if unreadable:
            raise TrainingError(
                f"the trainer user {user} cannot read {unreadable} of the base model (mode "
                f"{unreadable.stat().st_mode & 0o777:o}, owner uid {unreadable.stat().st_uid}); "
                f"run chmod -R a+rX {pipeline.base_model_host} or set LORAFLOW_TRAINER_USER to its owner"
            )


def unreadable_by(root: Path, uid: int, gid: int) -> Path | None:
    """The first file or directory under ``root`` that ``uid:gid`` could not read, if any."""
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        need = 0o5 if path.is_dir() else 0o4
        bits = (st.st_mode >> 6) if st.st_uid == uid else (st.st_mode >> 3) if st.st_gid == gid else st.st_mode
        if bits & need != need:
            return path
    return None


def connect(docker_url: str, timeout: int = API_TIMEOUT_S) -> APIClient:
    """The engine's low-level client, through the provider's hook (which pings it)."""
    return DockerHook(docker_conn_id=None, base_url=docker_url, timeout=timeout).api_client


def gpus_in_use(api: APIClient) -> set[str]:
    """GPUs held by running loraflow containers (their labels), including orphans of dead workers."""
    held: set[str] = set()
    for c in api.containers(filters={"label": gpus.LABEL}):
        held.update((c.get("Labels") or {}).get(gpus.LABEL, "").split(","))
    return held - {""}


def force_remove(api: APIClient, cid: str) -> None:
    """Remove a container, running or not; one already gone, or being removed, counts as removed.

    ``stop()`` (from ``on_kill``) and the run's own cleanup race to remove the same container:
    the loser gets 404, or 409 "removal ... is already in progress".
    """
    try:
        api.remove_container(cid, force=True)
    except NotFound:
        pass
    except APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc):
            raise


def remove_containers(run_id: str, api: APIClient | None = None, log: Callable[..., None] | None = None) -> list[str]:
    """Remove every container labelled with this DAG run; their names (none when no engine answers)."""
    if api is None:
        url = config.docker_url()
        if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
            return []  # a local-runtime machine: no engine, nothing to remove (and no error in the log)
        try:
            api = connect(url, timeout=30)
        except Exception:  # no engine answering: nothing to remove
            return []
    removed = []
    for c in api.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}"}):
        name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
        if log is not None:
            log("loraflow: removing container %s of this run", name)
        force_remove(api, c["Id"])  # gone meanwhile (its own task's cleanup) is fine
        removed.append(name)
    return removed


def remove_earlier_try(api: APIClient, pipeline: Pipeline, log: Callable[..., None]) -> None:
    """Stop and remove what an earlier try on this workspace left: the container of a try whose worker died.

    A worker killed mid-run leaves its trainer container running (the engine, not the worker,
    holds it), still writing checkpoints into the workspace and holding its GPUs. The retry
    stops it the way ``on_kill`` would (SIGTERM: it writes a checkpoint and exits 130, so this
    try resumes from the newest step), then removes it. Only this workspace's container: the
    other trials of a sweep share the run id.
    """
    name = container_name(pipeline)
    for c in api.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={pipeline.run_id}"}):
        if f"/{name}" not in (c.get("Names") or []):
            continue
        if c.get("State") == "running":
            log("loraflow: stopping %s, left running by an earlier try (its worker died)", name)
            try:
                api.stop(c["Id"], timeout=STOP_TIMEOUT_S)
            except NotFound:
                continue
        log("loraflow: removing container %s of an earlier try", name)
        force_remove(api, c["Id"])


def last_line_of(chunks: Iterable[bytes], log: Callable[..., None]) -> str:
    """Log a container's output line by line as it comes; its last non-empty line.

    Chunks split lines and UTF-8 characters anywhere; only the last line is kept (a long
    training prints a great many).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, last = "", ""
    for chunk in chunks:
        *lines, buffer = (buffer + decoder.decode(chunk)).split("\n")
        for line in lines:
            if line.strip():
                last = line.rstrip()
                log("%s", last)
    tail = (buffer + decoder.decode(b"", final=True)).rstrip()
    if tail.strip():
        last = tail
        log("%s", last)
    return last


def _refused(exc: APIError) -> TrainingError:
    msg = str(exc)
    if "capabilities" in msg and "gpu" in msg:
        return TrainingError(
            "the Docker host has no NVIDIA GPU runtime (could not select a gpu device driver); "
            "install the NVIDIA container toolkit or set gpus=none to train on CPU"
        )
    return TrainingError(f"Docker refused to run the trainer ({msg[:300]})")


class DockerRuntime:
    """Runs one entry point in a trainer container; ``stop()`` stops and removes it."""

    def __init__(self, settings: DockerSettings) -> None:
        self.settings = settings
        self._container: str | None = None
        self._stopped_state: dict[str, Any] = {}

    @cached_property
    def api(self) -> APIClient:
        try:
            return connect(self.settings.docker_url, self.settings.api_timeout)
        except Exception as exc:
            raise TrainingError(
                f"no Docker engine answers at {self.settings.docker_url} ({exc}); start it, set "
                "LORAFLOW_DOCKER_URL, or use runtime=local"
            ) from None

    def run(self, run: TrainerRun, log: Callable[..., None]) -> dict[str, Any]:
        pipeline, image = run.pipeline, self.settings.image
        try:
            digest = self.api.inspect_image(image)["Id"]
        except ImageNotFound:
            raise TrainingError(
                f"trainer image {image} is not on the Docker host; build it with "
                "scripts/build-trainer-image.sh or set LORAFLOW_IMAGE"
            ) from None
        # A try killed with its worker leaves its container behind, holding the name this try needs.
        remove_earlier_try(self.api, pipeline, log)
        with gpus.acquire(pipeline.gpus, busy=lambda: gpus_in_use(self.api), log=log) as lease:
            spec = container_spec(run, self.settings, lease)
            prepare_writable_dirs(pipeline, spec.user)
            self._run(spec, run.entry, log)
        return {"runtime": "docker", "image": image, "image_digest": digest, "exit_code": 0}

    def _run(self, spec: ContainerSpec, entry: Entry, log: Callable[..., None]) -> None:
        api = self.api
        log(
            "loraflow: starting %s from %s: %s (GPUs: %s)",
            spec.name,
            spec.image,
            spec.command,
            spec.labels.get(gpus.LABEL, "none"),
        )
        try:
            container = api.create_container(
                image=spec.image,
                command=spec.command,
                name=spec.name,
                user=spec.user,
                labels=spec.labels,
                environment={**spec.environment, **spec.private_environment},
                tty=False,
                host_config=api.create_host_config(**spec.host_config()),
            )
        except APIError as exc:
            raise _refused(exc) from None
        cid = self._container = container["Id"]
        try:
            stream = api.attach(container=cid, stdout=True, stderr=True, stream=True)
            try:
                api.start(cid)
            except APIError as exc:
                raise _refused(exc) from None
            last = last_line_of(stream, log)
            code, oom_killed = self._exit_state(cid)
            if code != 0:
                raise ContainerFailed(entry, code, oom_killed=oom_killed, last_line=last)
        finally:
            self._container = None
            try:
                force_remove(api, cid)  # stop() may have removed it, or be removing it
            except APIError as exc:  # teardown removes by label as a second line
                log("loraflow: could not remove container %s: %s", cid[:12], exc)

    def _exit_state(self, cid: str) -> tuple[int, bool]:
        """The exit code and whether the kernel's OOM killer ended it (Docker reports that only by inspection)."""
        try:
            code: int | None = int(self.api.wait(cid)["StatusCode"])
        except NotFound:  # stop() removed it in between: what it saw
            code = None
        try:
            state = self.api.inspect_container(cid)["State"]
        except NotFound:
            state = self._stopped_state
        return (int(state.get("ExitCode", -9)) if code is None else code), bool(state.get("OOMKilled"))

    def stop(self) -> None:
        cid = self._container
        if cid is None:
            return
        try:
            self.api.stop(cid, timeout=STOP_TIMEOUT_S)  # SIGTERM: the trainer checkpoints and exits 130
            self._stopped_state = self.api.inspect_container(cid)["State"]
            force_remove(self.api, cid)
        except NotFound:  # it ended and its run removed it
            pass
