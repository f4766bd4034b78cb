"""Quick text generation from a registered version: base model + LoRA adapter, in a child process.

``generate()`` runs in the caller (the ``loraflow`` CLI): it resolves the version, downloads
its ``model/`` artifact, checks that the base model is on this machine and starts
``python -m loraflow.generation`` with a JSON request on stdin. Only that child loads
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

from loraflow import lookup
from loraflow.errors import LoraflowError

STACK = ("torch", "transformers", "peft")


def generate(uri: str, ref: str, prompt: str, *, base_model_path: str | None = None,
             max_new_tokens: int = 32, raw: bool = False, timeout: float = 600) -> dict[str, Any]:
    missing = [m for m in STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraflowError(f"generate needs {', '.join(missing)} in this Python; install the trainer package "
                            "(pip install -e trainer_image) or run it where the trainer is installed")
    info = lookup.show(uri, ref)
    with tempfile.TemporaryDirectory(prefix="loraflow-generate-") as tmp:
        model_dir = _download_model(uri, info, Path(tmp))
        base = base_model_path or lookup.base_model_path(model_dir)
        if not base or not (Path(base) / "config.json").is_file():
            wanted = info["lineage"].get("base_model") or "its base model"
            raise LoraflowError(f"the base model of {info['name']}/{info['version']} is not at {base or '(no path recorded)'}; "
                                f"pass --base-model-path DIR pointing at a local copy of {wanted} (a directory with config.json)")
        request = {"model_dir": str(model_dir), "base_model_path": str(Path(base).resolve()), "prompt": prompt,
                   "max_new_tokens": int(max_new_tokens), "raw": raw}
        proc = subprocess.run([sys.executable, "-m", "loraflow.generation"], input=json.dumps(request), text=True,
                              capture_output=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LoraflowError(f"loading {info['name']}/{info['version']} for generation failed ({tail[0][:300]}); "
                            "check that --base-model-path is the model the adapter was trained on")
    return {"name": info["name"], "version": info["version"], "prompt": prompt, **result}


def _download_model(uri: str, info: dict[str, Any], tmp: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    with lookup.talking_to(uri):
        return Path(download_artifacts(run_id=info["mlflow_run_id"], artifact_path="model", dst_path=str(tmp), tracking_uri=uri))


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _child() -> None:
    """Load base + adapter via MLflow's transformers flavour and print one JSON line."""
    request = json.loads(sys.stdin.read())
    import mlflow.transformers

    parts = mlflow.transformers.load_model(request["model_dir"], return_type="components",
                                           base_model_path=request["base_model_path"])
    model, tok = parts["model"], parts["tokenizer"]
    model.eval()
    chat = bool(getattr(tok, "chat_template", None)) and not request["raw"]
    text = (tok.apply_chat_template([{"role": "user", "content": request["prompt"]}], tokenize=False, add_generation_prompt=True)
            if chat else request["prompt"])
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**enc, max_new_tokens=request["max_new_tokens"], do_sample=False, pad_token_id=pad)
    completion = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(json.dumps({"completion": completion, "device": str(model.device), "chat_template": chat,
                      "adapter": type(model).__name__}), flush=True)


if __name__ == "__main__":
    _child()
