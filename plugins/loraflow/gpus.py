"""GPUs as exclusive resources: the Airflow pool that queues training, and the per-GPU lease.

Two layers keep training runs from fighting over a GPU:

1. The Airflow pool ``LORAFLOW_GPU_POOL`` (default ``loraflow_gpu``), one slot per GPU of a
   worker (``ensure_pool`` creates it during set-up). Ten triggered runs take ten slots in
   turn: the extra train tasks wait as *scheduled* in Airflow, holding no worker slot.
2. A lease per GPU on the worker host: an exclusive ``flock`` on
   ``<LORAFLOW_HOME>/gpu-locks/gpu-<id>.lock`` held while the trainer runs, plus the running
   containers' ``loraflow.gpu`` labels (an orphaned container from a killed worker still
   counts as busy). ``gpus=auto`` takes the first free GPU; explicit ids wait for theirs.
   The kernel drops a flock when its process dies, so a crashed worker frees its GPUs.

A run asking for N GPUs (``gpus=0,1``, or ``all``) takes N slots of the pool: ``pool_slots``
cannot be templated (the scheduler reads it before the task runs), so the cluster policy in
``loraflow.policy`` sets it from the run's conf when the scheduler creates the task
instance. ``check_request`` refuses, before anything starts, ids this host lacks (a run
that asked for a GPU never trains on CPU), duplicates, and more GPUs than the pool holds.
The container learns its GPUs from ``LORAFLOW_GPUS`` (``loraflow_trainer.launch``).

The host's GPU ids come from ``LORAFLOW_GPU_IDS`` (``0,1,2,3``), else ``nvidia-smi``. How a
container gets its GPUs is ``LORAFLOW_GPU_REQUEST``: ``device_requests`` (default, the
``--gpus`` flag) or ``env`` (``NVIDIA_VISIBLE_DEVICES``, for engines whose default runtime
is ``nvidia``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import config
from loraflow.errors import TrainingError

POOL_DESCRIPTION = "loraflow training: one slot per GPU of a worker (LORAFLOW_GPU_SLOTS)"
LABEL = "loraflow.gpu"


def pool_name() -> str:
    return os.environ.get("LORAFLOW_GPU_POOL", "loraflow_gpu")


def host_gpu_ids() -> list[str]:
    """The GPU ids of this host: LORAFLOW_GPU_IDS, else what nvidia-smi lists, else none."""
    raw = os.environ.get("LORAFLOW_GPU_IDS")
    if raw is not None:
        return [g.strip() for g in raw.split(",") if g.strip()]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def pool_slots() -> int:
    """Slots of the training pool: LORAFLOW_GPU_SLOTS, else one per GPU, else one (CPU hosts)."""
    raw = os.environ.get("LORAFLOW_GPU_SLOTS")
    return int(raw) if raw else max(1, len(host_gpu_ids()))


def request_mode() -> str:
    mode = os.environ.get("LORAFLOW_GPU_REQUEST", "device_requests")
    if mode not in ("device_requests", "env"):
        raise TrainingError(
            f"LORAFLOW_GPU_REQUEST={mode!r} is not device_requests or env; fix the worker's environment"
        )
    return mode


def ensure_pool(env: dict[str, str] | None = None, python: str | None = None) -> int:
    """Create or resize the training pool in the Airflow DB (set-up step); return its slots."""
    import sys

    slots = pool_slots()
    subprocess.run(
        [python or sys.executable, "-m", "airflow", "pools", "set", pool_name(), str(slots), POOL_DESCRIPTION],
        env={**os.environ, **(env or {})},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return slots


@dataclass
class GpuLease:
    """The GPUs one training holds; ``ids`` is None for "all GPUs of an unknown host"."""

    ids: list[str] | None
    _files: list = field(default_factory=list, repr=False)

    @property
    def cpu_only(self) -> bool:
        return self.ids == []

    @property
    def visible(self) -> str:
        return "all" if self.ids is None else ",".join(self.ids)

    def release(self) -> None:
        for f in self._files:
            try:
                fcntl.flock(f, fcntl.LOCK_UN)
            finally:
                f.close()
        self._files.clear()

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_dir() -> Path:
    path = config.home() / "gpu-locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_lock(gpu: str):
    f = (_lock_dir() / f"gpu-{gpu}.lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def slots_for(gpus: str, host: list[str] | None = None) -> int:
    """Pool slots a run asking for ``gpus`` takes: one per GPU it will hold (one for CPU runs)."""
    if gpus in ("none", "auto"):
        return 1
    if gpus == "all":
        known = host_gpu_ids() if host is None else host
        return max(1, len(known) or pool_slots())
    return len(set(gpus.split(",")))


def check_request(gpus: str, host: list[str] | None = None) -> None:
    """Refuse, before anything starts, GPUs this worker does not have (a run asking for GPUs never trains on CPU)."""
    host = host_gpu_ids() if host is None else host
    if gpus in ("none", "auto", "all"):
        return
    ids = gpus.split(",")
    if len(set(ids)) != len(ids):
        raise TrainingError(f"gpus={gpus!r} names a GPU twice; list each id once, e.g. 0,1")
    if not host:
        raise TrainingError(
            f"gpus={gpus!r} names GPU {gpus}, but this worker has no GPU (LORAFLOW_GPU_IDS unset or "
            "empty, no nvidia-smi); use gpus=none or auto to train on CPU, or run on a GPU worker"
        )
    unknown = [g for g in ids if g not in host]
    if unknown:
        raise TrainingError(
            f"gpus={gpus!r} names GPU {', '.join(unknown)}, but this host has {', '.join(host)}; "
            "use auto, all, none or ids of this host"
        )
    check_slots(gpus)


def check_slots(gpus: str) -> None:
    """Refuse a request for more GPUs than the pool has slots: its train task would wait forever."""
    want, slots = slots_for(gpus), pool_slots()
    if want > slots:
        raise TrainingError(
            f"gpus={gpus!r} asks for {want} GPUs, but the pool {pool_name()} has {slots} slot(s) (one per "
            "GPU of a worker): the train task could never be scheduled; ask for at most that many"
        )


def acquire(
    gpus: str,
    busy: Callable[[], Iterable[str]] = lambda: (),
    log: Callable[[str], None] = print,
    timeout: float = 24 * 3600,
    poll: float = 5.0,
) -> GpuLease:
    """Lease the GPUs a run asked for, waiting while others hold them.

    ``busy`` returns GPU ids other trainers hold outside our locks (running containers'
    labels). ``gpus``: ``none`` (CPU), ``auto`` (one free GPU; CPU on a host without GPUs),
    ``all``, or ids ``0,2``.
    """
    if gpus == "none":
        return GpuLease([])
    host = host_gpu_ids()
    if gpus == "auto" and not host:
        log("loraflow: no GPUs on this host (LORAFLOW_GPU_IDS unset, no nvidia-smi): training on CPU")
        return GpuLease([])
    if gpus == "all" and not host:
        return GpuLease(None)  # the engine decides (and says so when it has no GPU runtime)
    wanted = host if gpus == "all" else None if gpus == "auto" else gpus.split(",")
    check_request(gpus, host)
    deadline = time.monotonic() + timeout
    said = False
    while True:
        taken = set(busy())
        if wanted is None:  # auto: the first free GPU
            for gpu in host:
                if gpu in taken:
                    continue
                f = _try_lock(gpu)
                if f is not None:
                    return GpuLease([gpu], [f])
        else:
            if not taken.intersection(wanted):
                files = []
                for gpu in wanted:
                    f = _try_lock(gpu)
                    if f is None:
                        break
                    files.append(f)
                else:
                    return GpuLease(list(wanted), files)
                GpuLease([], files).release()
        if time.monotonic() > deadline:
            raise TrainingError(
                f"no free GPU for gpus={gpus!r} after {timeout:.0f}s (held by other loraflow runs); "
                f"size the pool {pool_name()} to the GPUs or lower max_active_runs"
            )
        if not said:
            log(f"loraflow: waiting for GPU(s) {gpus} (held by other runs)")
            said = True
        time.sleep(poll)


def check_params(gpus: str, dp_enabled: bool = False) -> None:
    """The trigger's GPU request, checked in prepare (host-independent: ids are checked where the run trains)."""
    from loraflow.errors import ParamsError

    try:
        check_slots(gpus)
    except TrainingError as exc:
        raise ParamsError(str(exc)) from None
    if dp_enabled and slots_for(gpus) > 1:
        raise ParamsError(
            f"dp_enabled trains on one GPU, but gpus={gpus!r} asks for {slots_for(gpus)}: DP-SGD's accounting "
            "is for one process; set gpus to auto or one id"
        )
