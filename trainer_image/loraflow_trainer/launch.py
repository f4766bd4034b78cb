"""One job on several processes: how many, which strategy, and the torchrun launch.

``loraflow-train`` asks ``plan`` how many processes the job gets: one per CUDA device the
container sees (``torch.cuda.device_count()``), or ``training.num_processes``. For more
than one it re-runs itself under torchrun (``torch.distributed.run``, standalone c10d
rendezvous, no restarts); the HF Trainer and accelerate do the data parallelism (DDP) or
sharding (FSDP2) from the ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` torchrun sets. Nothing
distributed is written here by hand: this module only picks the numbers and turns
torchrun's failure report into one exit code with its cause.

A process that is already under a launcher (``LOCAL_RANK`` set: our own relaunch, or a
user's multi-node torchrun, see docs/multi-node.md) never relaunches.

The Airflow side says which GPUs it leased in ``LORAFLOW_GPUS``: a container that sees
fewer CUDA devices than that is refused (a run that asked for GPUs never trains on CPU
by accident). ``LORAFLOW_GPUS_ON_CPU=1`` is the test stand-in for hosts without a GPU
driver: each leased GPU becomes one CPU process on the gloo backend.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow_trainer import errors, progress
from loraflow_trainer.spec import JobSpec

ENV_LEASED_GPUS = "LORAFLOW_GPUS"
ENV_GPUS_ON_CPU = "LORAFLOW_GPUS_ON_CPU"
# How long a rank waits in a collective for the others (TrainingArguments.ddp_timeout):
# a rank that hangs (not dies: torchrun handles deaths) fails the run after this long.
DDP_TIMEOUT_S = int(os.environ.get("LORAFLOW_DDP_TIMEOUT_S", "1800"))


@dataclass(frozen=True)
class Plan:
    world_size: int
    device: str  # cuda or cpu
    strategy: str  # single, ddp or fsdp
    reason: str


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device, its place among the job's processes, the strategy."""

    device: str  # cuda or cpu
    local_rank: int  # under torchrun each rank owns one device (LOCAL_RANK)
    world_size: int
    is_main: bool  # rank 0, the one process that writes outputs
    strategy: str  # single, ddp or fsdp

    @property
    def torch_device(self):
        """This process's device: its own GPU under torchrun, else the CPU."""
        import torch

        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")


def placement(job: JobSpec) -> Placement:
    """This process's placement, from the launcher's environment (one process without one)."""
    import torch

    n = world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Placement(device, local_rank(), n, is_main_process(), strategy(job, n))


def strategy(job: JobSpec, n: int) -> str:
    if n == 1:
        return "single"
    # auto = ddp: a LoRA adapter's optimizer state is small, so replicating the (frozen)
    # base fits whenever the model fits one device; fsdp is the setting for those that do not.
    return "fsdp" if job.training.distributed == "fsdp" else "ddp"


def plan(job: JobSpec) -> Plan:
    """How many processes this job runs on, on what, and why; refuses impossible requests."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    leased = [g.strip() for g in os.environ.get(ENV_LEASED_GPUS, "").split(",") if g.strip()]
    wanted = job.training.num_processes
    if under_launcher():
        n = world_size()
        device = "cuda" if cuda else "cpu"
        p = Plan(n, device, strategy(job, n), "under a launcher (WORLD_SIZE)")
    elif leased and cuda == 0 and os.environ.get(ENV_GPUS_ON_CPU) == "1":
        n = wanted or len(leased)
        p = Plan(
            n,
            "cpu",
            strategy(job, n),
            f"{ENV_GPUS_ON_CPU}=1: GPU(s) {','.join(leased)} stand in as {n} CPU process(es)",
        )
    elif leased and cuda < len(leased):
        raise errors.NoGpuError(
            f"this run leased GPU(s) {','.join(leased)} but the trainer sees {cuda} CUDA device(s); install the NVIDIA "
            "container toolkit on the worker (or fix LORAFLOW_GPU_REQUEST), or set gpus=none to train on CPU"
        )
    elif cuda:
        if wanted and wanted > cuda:
            raise errors.NoGpuError(
                f"num_processes={wanted} but the trainer sees {cuda} CUDA device(s); "
                f"lower num_processes or give the run {wanted} GPUs"
            )
        n = wanted or cuda
        p = Plan(
            n,
            "cuda",
            strategy(job, n),
            f"{cuda} CUDA device(s) visible" + (f", num_processes={wanted}" if wanted else ""),
        )
    else:
        n = wanted or 1
        p = Plan(n, "cpu", strategy(job, n), f"no CUDA device, num_processes={n}")
    _check(job, p)
    return p


def _check(job: JobSpec, p: Plan) -> None:
    if p.world_size > 1 and job.privacy.dp_enabled:
        raise errors.JobSpecError(
            f"DP-SGD trains on one process, this run would use {p.world_size}: the privacy accounting assumes one "
            "Poisson-sampled batch per step, which loraflow does not yet split across ranks; give the run one GPU "
            "(gpus=auto or one id) or set num_processes=1"
        )
    if p.strategy == "fsdp" and job.model.quantization != "none":
        raise errors.JobSpecError(
            "distributed=fsdp with quantization is not supported yet (sharding k-bit weights needs bitsandbytes quant "
            "storage settings loraflow does not set); use distributed=ddp (a QLoRA model fits one GPU) or "
            "quantization=none"
        )


def relaunch(job_path: Path, p: Plan) -> int:
    """Run ``loraflow-train --job job_path`` on ``p.world_size`` local processes under torchrun.

    Returns 0 when every rank succeeded; otherwise raises the loraflow error of the rank
    that failed first (a killed rank wins over the ranks that then lost their peer), with
    its exit code. torchrun stops the surviving ranks itself (SIGTERM, then SIGKILL).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    visible = {
        k: os.environ[k] for k in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", ENV_LEASED_GPUS) if k in os.environ
    }
    progress.emit("launch", launcher="torchrun", **asdict(p), devices=visible)
    args = get_args_parser().parse_args(
        [
            # One node: rendezvous over loopback (a container without a network cannot resolve its own hostname).
            "--standalone",
            "--local-addr=127.0.0.1",
            f"--nproc-per-node={p.world_size}",
            "--max-restarts=0",
            "--monitor-interval=0.5",
            "-m",
            "loraflow_trainer",
            "--job",
            str(job_path),
        ]
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.world_size)))
    try:
        run(args)
    except ChildFailedError as exc:
        raise rank_failure(exc.failures, p.world_size) from None
    except SignalException as exc:
        raise KeyboardInterrupt(f"{exc.sigval.name}; every rank was stopped") from None
    return errors.EXIT_OK


def rank_failure(failures: dict, world: int) -> errors.LoraflowTrainerError:
    """One loraflow error from torchrun's per-rank failures (rank -> ProcessFailure)."""

    def key(item):
        _rank, f = item
        return (0 if f.exitcode < 0 else 1, f.timestamp)  # a signal is a cause; "peer gone" errors follow it

    ordered = sorted(failures.items(), key=key)
    first_rank, first = ordered[0]
    code = _exit_code(first.exitcode)
    cause = _cause(first)
    others = "; ".join(f"rank {r} then failed ({_cause(f)[:120]})" for r, f in ordered[1:])
    msg = (
        f"rank {first_rank} of {world} {cause}"
        + (f"; {others}" if others else "")
        + "; torchrun stopped the other ranks"
        + (
            " (checkpoints kept, a retry resumes)"
            if code in (errors.EXIT_INTERRUPTED, errors.EXIT_KILLED, errors.EXIT_FAILURE, errors.EXIT_OUT_OF_MEMORY)
            else ""
        )
    )
    return errors.RankFailedError(msg, code)


def _exit_code(code: int) -> int:
    if code >= 0:
        return code
    if -code in (signal.SIGTERM, signal.SIGINT):
        return errors.EXIT_INTERRUPTED
    return errors.EXIT_KILLED if -code == signal.SIGKILL else 128 - code


def _cause(f) -> str:
    if f.exitcode < 0:
        return f"was killed by {signal.Signals(-f.exitcode).name} (exit {_exit_code(f.exitcode)})"
    message = f.message if isinstance(f.message, str) and not f.message.startswith("To enable traceback") else ""
    return f"failed with exit {f.exitcode}: {message or errors.EXIT_MEANINGS.get(f.exitcode, 'see its log')}"


def record_failure(message: str) -> None:
    """Under torchrun, leave this rank's cause where the launcher reads it (its error file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        pass


def quiet_other_ranks() -> None:
    """Only rank 0 prints progress lines (one log, not N interleaved copies); every rank keeps stderr."""
    if under_launcher() and not is_main_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
