"""Where a trainer entry point runs: the runtimes, and what they have in common.

An operator (``loraflow.operators``) hands a runtime one ``TrainerRun``: the run's
pipeline settings, the entry point (``TRAIN`` or ``EVALUATE``), the task id and the
author's extra environment. The runtime leases the run's GPUs (``loraflow.gpus``), runs
the entry point to its end with its lines in the task log, and raises ``TrainerFailed``
(exit code and cause, from ``loraflow_trainer.errors.EXIT_MEANINGS``) when it exits
non-zero. ``stop()`` is the operator's ``on_kill``: SIGTERM, so the trainer checkpoints and
exits 130, then SIGKILL after ``STOP_TIMEOUT_S``.

- ``local`` (``loraflow.runtimes.local``): a subprocess of the worker, for machines
  without Docker (development, tests).
- ``docker`` (``loraflow.runtimes.docker``): a hardened container of the trainer image;
  every Docker specific (mounts, the ``/models`` path, hardening, user, GPUs, labels,
  removal) lives there.

``model_path(runtime, host_path)`` is how the trainer of a runtime sees a base model
directory of the model cache; prepare writes it into job.json.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from loraflow.errors import TrainingError
from loraflow_trainer.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_KILLED, EXIT_MEANINGS

if TYPE_CHECKING:
    from collections.abc import Callable

    from loraflow.gpus import GpuLease
    from loraflow.workspace import Pipeline

NAMES = ("local", "docker")
STOP_TIMEOUT_S = 60  # SIGTERM -> SIGKILL: time for the trainer to write its checkpoint and exit


@dataclass(frozen=True)
class Entry:
    """A trainer entry point: a console script or a module, and what its failure is called."""

    name: str  # "training failed (exit 3): ..."
    script: str | None = None
    module: str | None = None


TRAIN = Entry("training", script="loraflow-train")
EVALUATE = Entry("evaluate", module="loraflow_trainer.evaluate")


@dataclass(frozen=True)
class TrainerRun:
    """One run of an entry point on a run workspace, as an operator hands it to a runtime."""

    pipeline: Pipeline
    entry: Entry
    task_id: str
    environment: dict[str, str] = field(default_factory=dict)  # the DAG author's, public (not secrets)


class Runtime(Protocol):
    def run(self, run: TrainerRun, log: Callable[..., None]) -> dict[str, Any]:
        """Run ``run`` to its end; the provenance register records (runtime, image, image_digest, exit_code)."""

    def stop(self) -> None:
        """Stop a run in progress (the operator's on_kill); nothing when none is."""


class TrainerFailed(TrainingError):
    """The trainer exited non-zero: ``exit_code`` (negative: killed by that signal) and its ``cause``."""

    def __init__(self, entry: Entry, exit_code: int, *, oom_killed: bool = False, last_line: str = "") -> None:
        self.exit_code = exit_code
        self.oom_killed = oom_killed
        self.cause = explain_exit(exit_code, oom_killed)
        self.last_line = last_line
        tail = f". Last trainer line: {last_line[:500]}" if last_line else ""
        super().__init__(f"{entry.name} failed (exit {exit_code}): {self.cause}{tail}")

    @property
    def retry_helps(self) -> bool:
        """Whether the task's retry can succeed: an interruption or a kill, not a fault the user must fix.

        Interrupted (130), killed by a signal or SIGKILLed without the OOM flag (a host going
        away), or an unexpected error (1): the retry resumes from the newest checkpoint. A bad
        spec, bad data, a missing model, out of memory, no GPU or a full disk fail the same
        way again, so the task fails at once instead of spending its retries (and GPU time).
        """
        if self.exit_code < 0 or self.exit_code in (EXIT_FAILURE, EXIT_INTERRUPTED):
            return True
        return self.exit_code == EXIT_KILLED and not self.oom_killed


def explain_exit(code: int, oom_killed: bool = False) -> str:
    """The cause of a trainer exit status, in one sentence with its fix."""
    if code == EXIT_KILLED and oom_killed:
        return (
            "out of memory: the container hit its memory limit and was killed (exit 137); raise memory_limit "
            "or lower per_device_train_batch_size/max_seq_length"
        )
    if code < 0:
        return f"the trainer was killed by signal {signal.Signals(-code).name}"
    return EXIT_MEANINGS.get(code, f"the trainer exited with unexpected code {code}")


def trainer_gpu_env(lease: GpuLease) -> dict[str, str]:
    """What the trainer needs to know of its GPUs: the leased ids (it refuses to see fewer), and the CPU stand-in."""
    env = {"LORAFLOW_GPUS": lease.visible} if lease.ids else {}
    if os.environ.get("LORAFLOW_GPUS_ON_CPU") == "1":  # hosts without a GPU driver (tests): a GPU is a gloo process
        env["LORAFLOW_GPUS_ON_CPU"] = "1"
    return env


# Both runtimes: the trainer's lines reach the task log as they are written, without progress bars.
STREAMING_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def model_path(runtime: str, host_path: str) -> str:
    """The base model as the trainer of ``runtime`` sees it (a hub id is the same everywhere)."""
    if runtime == "docker":
        from loraflow.runtimes import docker

        return docker.model_path(host_path)
    return host_path
