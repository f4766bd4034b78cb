"""``loraflow-train``: run one job spec, or build the tiny model.

Progress goes to stdout as one readable line per event (read through ``docker logs``), and
as JSON to ``output/events.jsonl`` (see ``progress``); the exit code
says what went wrong (see ``errors``), with a one-line cause on stderr. Heavy imports
happen after the spec is validated, so a bad spec fails in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from loraflow_trainer import contract, errors, progress, spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraflow-train",
        description="Fine-tune a causal LM with LoRA/QLoRA/DP-SGD from a loraflow job spec.",
        epilog="exit codes: " + "; ".join(f"{code} = {text}" for code, text in errors.EXIT_MEANINGS.items()),
    )
    p.add_argument("--job", type=Path, help="path of job.json (relative paths in it resolve against its directory)")
    p.add_argument("--print-schema", action="store_true", help="print the job spec JSON schema and exit")
    sub = p.add_subparsers(dest="command")
    tiny = sub.add_parser("make-tiny-model", help="build a tiny random Llama model + tokenizer for tests and demos")
    tiny.add_argument("--out", type=Path, required=True, help="directory to save the model to")
    tiny.add_argument(
        "--data", type=Path, nargs="+", required=True, help="JSONL/CSV/Parquet/text files to train the tokenizer on"
    )
    tiny.add_argument("--vocab-size", type=int, default=1024)
    tiny.add_argument("--seed", type=int, default=0)
    return p


def _fail(exc: BaseException, code: int) -> int:
    from loraflow_trainer import launch

    launch.record_failure(str(exc))  # under torchrun: the cause the launcher reports for this rank
    print(f"loraflow-train: error: {exc}", file=sys.stderr, flush=True)
    progress.emit("failed", exit_code=code, error=str(exc))
    return code


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _check_local_model(job: spec.JobSpec, job_dir: Path) -> None:
    # A local base model that is not a saved model fails here, before torch loads; hub ids
    # are resolved (and reported) by the model stage.
    if job.is_local_model(job_dir):
        path = job.resolve(job.model.base_model, job_dir)
        if not contract.is_model_dir(path):
            raise errors.ModelNotFoundError(contract.missing_model_message(path))


def run_job(job_path: Path) -> int:
    # docker stop sends SIGTERM: outside the training loop (which checkpoints first) it
    # unwinds like Ctrl-C, so teardown runs and the exit code says "interrupted".
    signal.signal(signal.SIGTERM, _interrupt)
    from loraflow_trainer import launch

    launch.quiet_other_ranks()
    job = spec.load(job_path)
    job_dir = job_path.resolve().parent
    out = job.resolve(job.output_dir, job_dir)
    # People read the task log: library progress bars (carriage returns) and notices they
    # cannot act on stay out of it; the JSON events go to output/events.jsonl.
    progress.quiet_libraries()
    progress.open_events(out)
    from loraflow_trainer.data import preflight

    preflight(job, job_dir)
    _check_local_model(job, job_dir)
    # More than one device: the same job again under torchrun, one process per device.
    plan = launch.plan(job)
    if plan.world_size > 1 and not launch.under_launcher():
        return launch.relaunch(job_path.resolve(), plan)
    from loraflow_trainer import recipe

    built = recipe.Built()
    try:
        recipe.run(job, job_dir, built)
    except Exception as exc:
        # torch.save reports a full disk as "unexpected pos ..." with the errno lost: ask the disk.
        if not isinstance(exc, errors.LoraflowTrainerError) and disk_nearly_full(out):
            first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise errors.DiskFullError(
                f"no space left on the volume of {out} ({shutil.disk_usage(out).free // 1024} KiB free; "
                f"the write failed with {type(exc).__name__}: {first_line}); "
                "free space (or move LORAFLOW_HOME), then retry: checkpoints are kept"
            ) from exc
        raise
    finally:
        if not _PROCESS_ENDS_AFTER_JOB:  # in-process callers get their memory back
            recipe.teardown(built)
    return errors.EXIT_OK


def disk_nearly_full(path: Path, threshold: int = 1 << 20) -> bool:
    """Whether the volume holding ``path`` has less than ``threshold`` bytes left for us."""
    try:
        return shutil.disk_usage(path).free < threshold
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.print_schema:
            print(json.dumps(spec.json_schema(), indent=2))
            return errors.EXIT_OK
        if args.command == "make-tiny-model":
            from loraflow_trainer.tiny import build_tiny_model, corpus_texts

            out = build_tiny_model(args.out, corpus_texts(args.data), vocab_size=args.vocab_size, seed=args.seed)
            progress.emit("tiny_model", path=str(out))
            return errors.EXIT_OK
        if args.job is None:
            raise errors.JobSpecError("no job given; pass --job path/to/job.json")
        return run_job(args.job)
    except errors.LoraflowTrainerError as exc:
        return _fail(exc, exc.exit_code)
    except KeyboardInterrupt as exc:
        return _fail(
            RuntimeError(f"interrupted ({exc or 'SIGINT'}); checkpoints kept, a retry resumes"), errors.EXIT_INTERRUPTED
        )
    except MemoryError:
        return _fail(
            errors.OutOfMemoryError("out of host memory; lower per_device_train_batch_size or max_seq_length"),
            errors.EXIT_OUT_OF_MEMORY,
        )
    except Exception as exc:  # the CLI's last line of defence: a cause line instead of silence
        import traceback

        traceback.print_exc()
        failure = classify(exc)
        return _fail(failure, failure.exit_code)


def classify(exc: BaseException) -> errors.LoraflowTrainerError:
    """The loraflow error an unexpected library exception stands for (OOM, or a plain failure)."""
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    # torch.OutOfMemoryError (CUDA) and allocator RuntimeErrors are matched by name and
    # text, so this module never imports torch.
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in first_line.lower():
        return errors.OutOfMemoryError(
            f"out of memory ({first_line[:160]}); lower per_device_train_batch_size or max_seq_length, "
            "or use quantization=4bit"
        )
    if _disk_full(exc):
        return errors.DiskFullError(
            f"no space left on device ({first_line[:160]}); free space on the volume that "
            "holds the output directory (or move LORAFLOW_HOME), then retry: "
            "checkpoints are kept"
        )
    return errors.LoraflowTrainerError(f"{type(exc).__name__}: {first_line[:300]}")


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (torch and safetensors re-raise it as their own errors)."""
    import errno

    seen = 0
    while exc is not None and seen < 10:
        text = str(exc)
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in text or "os error 28" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


_PROCESS_ENDS_AFTER_JOB = False


def entrypoint() -> None:
    """The ``loraflow-train`` command: ``main``, then a prompt exit.

    Once the outputs are on disk (or the failure is reported) nothing is left to clean up
    that the kernel does not: freeing the model and unloading torch/transformers/peft
    modules at interpreter shutdown took ~2.5 s of every run (measured, tiny model).
    """
    global _PROCESS_ENDS_AFTER_JOB
    _PROCESS_ENDS_AFTER_JOB = True
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
