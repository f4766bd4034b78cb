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
    require_stack("generate")
    info = lookup.show(uri, ref)
    with tempfile.TemporaryDirectory(prefix="loraflow-generate-") as tmp:
        model_dir = lookup.download_model(uri, info, Path(tmp))
        base = lookup.resolve_base(model_dir, info, base_model_path)
        request = {"model_dir": str(model_dir), "base_model_path": base, "prompt": prompt,
                   "max_new_tokens": int(max_new_tokens), "raw": raw}
        proc = subprocess.run([sys.executable, "-m", "loraflow.generation"], input=json.dumps(request), text=True,
                              capture_output=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LoraflowError(f"loading {info['name']}/{info['version']} for generation failed ({tail[0][:300]}); "
                            "check that --base-model-path is the model the adapter was trained on")
    return {"name": info["name"], "version": info["version"], "prompt": prompt, **result}


def require_stack(what: str) -> None:
    missing = [m for m in STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise LoraflowError(f"{what} needs {', '.join(missing)} in this Python; install the trainer package "
                            "(pip install -e trainer_image) or run it where the trainer is installed")


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def load(model_dir: str | Path, base_model_path: str | None):
    """(model, tokenizer) of a downloaded version: the base with the adapter, via MLflow's transformers loader.

    Imports torch: call it only in a process meant to hold the model (the generate child, ``serve``).
    """
    import mlflow.transformers

    local = base_model_path if base_model_path and Path(base_model_path).is_dir() else None  # a hub base: MLflow's own reference
    parts = mlflow.transformers.load_model(str(model_dir), return_type="components", base_model_path=local)
    model, tok = parts["model"], parts["tokenizer"]
    model.eval()
    return model, tok


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def complete(model, tok, prompt: str | None = None, *, messages: list[dict] | None = None, max_new_tokens: int = 32,
             raw: bool = False, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
    """One completion: ``messages`` (or a bare ``prompt`` as one user turn) through the chat template, unless ``raw``.

    ``temperature`` 0 is greedy decoding (what ``generate`` and the trainer's samples use).
    """
    import torch

    chat = messages is not None or (has_chat_template(tok) and not raw)
    if chat:
        text = tok.apply_chat_template(messages or [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_p=float(top_p))
        if seed is not None:
            torch.manual_seed(int(seed))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=int(max_new_tokens), pad_token_id=pad, **kwargs)
    new = out[0, enc["input_ids"].shape[1]:]
    stopped = tok.eos_token_id is not None and len(new) > 0 and int(new[-1]) == tok.eos_token_id
    return {"completion": tok.decode(new, skip_special_tokens=True), "chat_template": chat,
            "prompt_tokens": int(enc["input_ids"].shape[1]), "completion_tokens": int(len(new)),
            "finish_reason": "stop" if stopped else "length"}


def _child() -> None:
    """Load base + adapter via MLflow's transformers flavour and print one JSON line."""
    request = json.loads(sys.stdin.read())
    model, tok = load(request["model_dir"], request["base_model_path"])
    result = complete(model, tok, request["prompt"], max_new_tokens=request["max_new_tokens"], raw=request["raw"])
    print(json.dumps({"completion": result["completion"], "device": str(model.device), "chat_template": result["chat_template"],
                      "adapter": type(model).__name__}), flush=True)


if __name__ == "__main__":
    _child()
