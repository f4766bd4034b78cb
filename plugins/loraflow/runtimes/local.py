"""The ``local`` runtime: the trainer as a subprocess of the worker, for machines without Docker.

An argument list, never a shell; the worker's environment plus the trainer's (streaming,
GPUs as ``CUDA_VISIBLE_DEVICES`` and ``LORAFLOW_GPUS``, the author's ``environment``, the
hub token from ``loraflow.secrets``); the workspace as working directory; its own process
group, so ``stop()`` reaches the ranks a multi-GPU trainer starts. What confines the
trainer in Docker (limits, mounts, user, network) does not exist here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflow import gpus, secrets
from loraflow.errors import TrainingError
from loraflow.runtimes import STOP_TIMEOUT_S, STREAMING_ENV, Entry, TrainerFailed, TrainerRun, trainer_gpu_env
from loraflow_trainer.contract import JOB_FILE


def trainer_command() -> list[str]:
    """The trainer's console script: LORAFLOW_TRAINER_BIN, else beside this interpreter, else on PATH."""
    explicit = os.environ.get("LORAFLOW_TRAINER_BIN")
    if explicit:
        return [explicit]
    beside = Path(sys.executable).parent / "loraflow-train"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("loraflow-train")
    if found:
        return [found]
    raise TrainingError(
        "loraflow-train is not installed for the local runtime; "
        "pip install 'trainer_image[train]' or use runtime=docker"
    )


def trainer_python() -> str:
    """The interpreter of the trainer's environment (beside its loraflow-train), for module entry points."""
    beside = Path(trainer_command()[0]).parent / "python"
    return str(beside) if beside.exists() else sys.executable


def command(entry: Entry, workspace: str | Path) -> list[str]:
    """The argument list that runs ``entry`` on a workspace."""
    head = trainer_command() if entry.script else [trainer_python(), "-m", str(entry.module)]
    return [*head, "--job", str(Path(workspace) / JOB_FILE)]


class LocalRuntime:
    """Runs one entry point as a subprocess; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def run(self, run: TrainerRun, log: Callable[..., None]) -> dict[str, Any]:
        pipeline = run.pipeline
        with gpus.acquire(pipeline.gpus, log=log) as lease:
            cmd = command(run.entry, pipeline.workspace)
            log("loraflow: running the trainer locally: %s (GPUs: %s)", cmd, lease.visible or "none")
            env = {**os.environ, **STREAMING_ENV, **run.environment, **secrets.trainer_env()}
            if lease.ids is not None:
                env["CUDA_VISIBLE_DEVICES"] = lease.visible
            env.update(trainer_gpu_env(lease))
            self._proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=pipeline.workspace,
                start_new_session=True,
            )
            last = ""
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                if line:
                    last = line
                    log("%s", line)
            code = self._proc.wait()
        if code != 0:
            raise TrainerFailed(run.entry, code, last_line=last)
        return {"runtime": "local", "image": None, "image_digest": None, "exit_code": 0}

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer checkpoints and exits; its process group goes with it
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
