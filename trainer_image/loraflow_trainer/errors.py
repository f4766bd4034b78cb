"""loraflow_trainer's errors and the CLI exit codes they map to.

Torch-free: the Airflow side imports the exit codes to turn a container's exit status
into a task error that names the cause.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # anything not below: a bug or an unexpected library error
EXIT_BAD_SPEC = 2  # job.json missing, not JSON, or invalid
EXIT_BAD_DATA = 3  # dataset missing, unreadable, wrong columns, empty after filtering
EXIT_MODEL_NOT_FOUND = 4  # base model path missing or hub id unknown/unreachable offline
EXIT_OUT_OF_MEMORY = 5  # CUDA/CPU out of memory caught in-process
EXIT_NO_GPU = 6  # the job needs a GPU feature (e.g. bitsandbytes CUDA) that is not there
EXIT_DISK_FULL = 7  # no space left writing checkpoints or outputs; nothing is marked complete
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: checkpoints kept, a retry resumes
EXIT_KILLED = 137  # not ours: SIGKILL, usually the kernel OOM killer on a container memory limit

EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_FAILURE: "training failed with an unexpected error; see the log above",
    EXIT_BAD_SPEC: "the job spec is invalid; fix the trigger params or job.json",
    EXIT_BAD_DATA: "the training data is unusable; fix the dataset named in the log",
    EXIT_MODEL_NOT_FOUND: "the base model was not found; check base_model and the model cache mount",
    EXIT_OUT_OF_MEMORY: "out of memory; lower per_device_train_batch_size or max_seq_length, or use quantization=4bit",
    EXIT_NO_GPU: "the job needs a GPU that is not available; request a GPU or change the settings for CPU",
    EXIT_DISK_FULL: "no space left on the workspace volume; free space (or move LORAFLOW_HOME) and retry, "
    "checkpoints are kept",
    EXIT_INTERRUPTED: "training was interrupted; checkpoints were kept and a retry resumes from the last one",
    EXIT_KILLED: "the trainer was killed (SIGKILL), most often out of memory at the container limit; raise the memory "
    "limit or lower the batch size",
}


class LoraflowTrainerError(Exception):
    """A failure a user can fix; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILURE


class JobSpecError(LoraflowTrainerError):
    exit_code = EXIT_BAD_SPEC


class DataError(LoraflowTrainerError):
    exit_code = EXIT_BAD_DATA


class ModelNotFoundError(LoraflowTrainerError):
    exit_code = EXIT_MODEL_NOT_FOUND


class OutOfMemoryError(LoraflowTrainerError):
    exit_code = EXIT_OUT_OF_MEMORY


class NoGpuError(LoraflowTrainerError):
    exit_code = EXIT_NO_GPU


class DiskFullError(LoraflowTrainerError):
    exit_code = EXIT_DISK_FULL


class RankFailedError(LoraflowTrainerError):
    """A rank of a multi-process run failed; the run exits with that rank's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
