"""Quick text generation from a registered version: base model + LoRA adapter, in a child process.

``generate()`` runs in the caller (the ``loraflow`` CLI): it resolves the version, downloads
its ``model/`` artifact, checks that the base model is on this machine and starts
``python -m loraflow_trainer.inference`` with a JSON request on stdin. Only that child (the trainer
package, the torch world) loads
torch, transformers and peft (through MLflow's transformers flavour, the same loader as
``mlflow.pyfunc.load_model``), so neither the CLI nor anything Airflow imports pays for
or depends on the training stack. The child uses a GPU when torch sees one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loraflow import registry
from loraflow.errors import LoraflowError

STACK = ("torch", "transformers", "peft")


def generate(
    uri: str,
    ref: str,
    prompt: str,
    *,
    base_model_path: str | None = None,
    max_new_tokens: int = 32,
    raw: bool = False,
    timeout: float = 600,
) -> dict[str, Any]:
    require_stack("generate")
    info = registry.show(uri, ref)
    with tempfile.TemporaryDirectory(prefix="loraflow-generate-") as tmp:
        model_dir = registry.download_model(uri, info, Path(tmp))
        base = registry.resolve_base(model_dir, info, base_model_path)
        request = {
            "model_dir": str(model_dir),
            "base_model_path": base,
            "prompt": prompt,
            "max_new_tokens": int(max_new_tokens),
            "raw": raw,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "loraflow_trainer.inference"],
            input=json.dumps(request),
            text=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LoraflowError(
            f"loading {info['name']}/{info['version']} for generation failed ({tail[0][:300]}); "
            "check that --base-model-path is the model the adapter was trained on"
        )
    return {"name": info["name"], "version": info["version"], "prompt": prompt, **result}


def require_stack(what: str) -> None:
    missing = [m for m in STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraflowError(
            f"{what} needs {', '.join(missing)} in this Python; install the trainer package "
            "(pip install -e trainer_image) or run it where the trainer is installed"
        )


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
