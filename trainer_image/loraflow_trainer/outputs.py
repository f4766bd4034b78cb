"""The outputs stage: what a finished run leaves in its output directory, ``_SUCCESS`` last.

::

    adapter/          the PEFT adapter and the tokenizer (save_pretrained)
    model/            an MLflow transformers-flavour model: the adapter plus a reference to the base
    metrics.json      the run's metrics
    dp_accounting.json  (DP runs) everything needed to recompute epsilon
    samples.jsonl     each sample prompt with its completion before and after training
    metadata.json     base model reference, code and library versions, spec hash, checksums of adapter/ and model/
    _SUCCESS          written last: an output without it is incomplete

Everything is written under a staging directory and renamed into place, and the marker
goes last, so a crash never leaves an output that looks complete. The names are
``contract``'s, which the Airflow side's registration reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loraflow_trainer import base_model, contract, progress
from loraflow_trainer.model import base_model_dir
from loraflow_trainer.spec import JobSpec


def save(
    output_dir: Path,
    job: JobSpec,
    job_dir: Path,
    model,
    tokenizer,
    metrics: dict[str, Any],
    samples: list[dict[str, Any]],
    accounting: dict[str, Any] | None,
    device: str,
) -> Path:
    """Write the trained ``model``'s outputs (see the module docstring) into ``output_dir``; return it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / contract.SUCCESS).unlink(missing_ok=True)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    base_dir = base_model_dir(job, job_dir)
    try:
        ref = base_reference(job, base_dir, model)  # hashes the base's weights: once
        model.save_pretrained(staging / contract.ADAPTER_DIR)
        tokenizer.save_pretrained(staging / contract.ADAPTER_DIR)
        save_mlflow_model(staging / contract.MODEL_DIR, model, tokenizer, job, base_dir, ref)
        with (staging / contract.SAMPLES_FILE).open("w") as f:
            for row in samples:
                f.write(json.dumps(row) + "\n")
        (staging / contract.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if accounting is not None:
            (staging / contract.ACCOUNTING_FILE).write_text(json.dumps(accounting, indent=2))
        meta = metadata(staging, job, base_dir, ref, device)
        (staging / contract.METADATA_FILE).write_text(json.dumps(meta, indent=2))
        for item in sorted(staging.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a half-written output must not linger (or fill the disk)
        raise
    contract.atomic_write_json(out / contract.SUCCESS, {"completed_at": time.time()})
    progress.emit("saved", output_dir=str(out))
    return out


def base_reference(job: JobSpec, base_dir: Path | None, model) -> dict[str, Any]:
    """The base as a portable reference (cache name + weights hash, or hub id + commit)."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) if base_dir is None else None
    return base_model.reference(job.model.base_model, base_dir, job.model.model_revision, commit)


def metadata(staging: Path, job: JobSpec, base_dir: Path | None, ref: dict[str, Any], device: str) -> dict[str, Any]:
    """What trained this output and on what, and the sha256 of every file under adapter/ and model/."""
    import peft
    import transformers

    from loraflow_trainer import __version__

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    for name in ("bitsandbytes", "opacus", "mlflow"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # optional at runtime: record what is there
            pass
    checksums = {
        str(p.relative_to(staging)): base_model.file_sha256(p)
        for sub in (contract.ADAPTER_DIR, contract.MODEL_DIR)
        for p in sorted((staging / sub).rglob("*"))
        if p.is_file()
    }
    return {
        "base_model": job.model.base_model,
        "base_model_dir": str(base_dir) if base_dir else None,
        "base_model_ref": ref,
        "code": code_provenance(__version__),
        "spec_hash": job.spec_hash(),
        "data_fingerprint": job.data_fingerprint,
        "labels": job.labels,
        "loraflow_trainer": __version__,
        "versions": versions,
        "device": device,
        "checksums": checksums,
    }


def save_mlflow_model(path: Path, model, tokenizer, job: JobSpec, base_dir: Path | None, ref: dict[str, Any]) -> None:
    """An MLflow transformers-flavour model holding the adapter and a reference to the base."""
    import mlflow
    import peft
    import transformers
    from mlflow.models import infer_signature

    signature = infer_signature(
        model_input=["prompt"],
        model_output=["completion"],
        params={"max_new_tokens": job.evaluation.sample_max_new_tokens, "do_sample": False, "temperature": 1.0},
    )
    pip = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"peft=={peft.__version__}",
        f"mlflow-skinny=={mlflow.__version__}",
    ]
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(path),
        task="text-generation",
        signature=signature,
        pip_requirements=pip,
        # Serve the completion, not the prompt echoed back in front of it.
        model_config={"return_full_text": False},
        base_model_path=str(base_dir) if base_dir else None,
        metadata={
            "loraflow.base_model": job.model.base_model,
            "loraflow.spec_hash": job.spec_hash(),
            base_model.REF_KEY: ref,
        },
    )
    if base_dir is not None:
        bundle_base_resolver(path)


def bundle_base_resolver(model_path: Path) -> None:
    """Point the MLflow model's pyfunc loader at a copy of ``base_model`` inside the model.

    The transformers flavour would load the base from the absolute path it was trained at
    (``/models/<name>`` in the container); the bundled loader resolves the recorded
    reference on the loading host instead, so ``mlflow.pyfunc.load_model`` works there.
    The transformers flavour itself is left as MLflow wrote it.
    """
    from mlflow.models import Model
    from mlflow.pyfunc import CODE, MAIN

    code = model_path / "code"
    code.mkdir(exist_ok=True)
    shutil.copyfile(base_model.__file__, code / f"{base_model.BUNDLED_MODULE}.py")
    mlmodel = Model.load(str(model_path / "MLmodel"))
    mlmodel.flavors["python_function"].update({MAIN: base_model.BUNDLED_MODULE, CODE: "code"})
    mlmodel.save(str(model_path / "MLmodel"))


def code_provenance(trainer_version: str) -> dict[str, str | None]:
    """What trained this version: the trainer's version, the git commit of its source, the image."""
    commit = os.environ.get("LORAFLOW_GIT_COMMIT")
    if not commit:
        try:
            commit = (
                subprocess.run(
                    ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):  # no git in the image: the image digest identifies the code
            commit = None
    return {
        "loraflow_trainer": trainer_version,
        "git_commit": commit,
        "image": os.environ.get("LORAFLOW_IMAGE") or None,
        "image_digest": os.environ.get("LORAFLOW_IMAGE_DIGEST") or None,
    }
