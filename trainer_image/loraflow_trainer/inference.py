"""Inference on a registered version, for the ``loraflow models`` commands (generate, serve, export).

The torch side of those commands: ``load`` (base + adapter through MLflow's transformers
flavour, the same loader as ``mlflow.pyfunc.load_model``), ``complete`` (one completion, chat
template applied), ``merge`` (the adapter folded into the base). The Airflow package calls these
only from CLI processes meant to hold a model, never from anything Airflow imports.
``python -m loraflow_trainer.inference`` is the ``generate`` child: a JSON request on stdin,
one JSON line out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(model_dir: str | Path, base_model_path: str | None):
    """(model, tokenizer) of a downloaded version: the base with the adapter, via MLflow's transformers loader.

    Imports torch: call it only in a process meant to hold the model (the generate child, ``serve``).
    """
    import mlflow.transformers

    # A hub base: MLflow's own reference.
    local = base_model_path if base_model_path and Path(base_model_path).is_dir() else None
    parts = mlflow.transformers.load_model(str(model_dir), return_type="components", base_model_path=local)
    model, tok = parts["model"], parts["tokenizer"]
    model.eval()
    return model, tok


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def complete(
    model,
    tok,
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    max_new_tokens: int = 32,
    raw: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """One completion: ``messages`` (or a bare ``prompt`` as one user turn) through the chat template, unless ``raw``.

    ``temperature`` 0 is greedy decoding (what ``generate`` and the trainer's samples use).
    """
    import torch

    chat = messages is not None or (has_chat_template(tok) and not raw)
    if chat:
        text = tok.apply_chat_template(
            messages or [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
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
    new = out[0, enc["input_ids"].shape[1] :]
    stopped = tok.eos_token_id is not None and len(new) > 0 and int(new[-1]) == tok.eos_token_id
    return {
        "completion": tok.decode(new, skip_special_tokens=True),
        "chat_template": chat,
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "completion_tokens": int(len(new)),
        "finish_reason": "stop" if stopped else "length",
    }


def _child() -> None:
    """Load base + adapter via MLflow's transformers flavour and print one JSON line."""
    request = json.loads(sys.stdin.read())
    model, tok = load(request["model_dir"], request["base_model_path"])
    result = complete(model, tok, request["prompt"], max_new_tokens=request["max_new_tokens"], raw=request["raw"])
    print(
        json.dumps(
            {
                "completion": result["completion"],
                "device": str(model.device),
                "chat_template": result["chat_template"],
                "adapter": type(model).__name__,
            }
        ),
        flush=True,
    )


def merge(adapter: Path, tokenizer: Path, base: str, out: Path) -> str:
    """Fold the adapter into the base (in the base's dtype) and save a plain HF model directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    dtype = str(model.dtype).removeprefix("torch.")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(out))
    return dtype


if __name__ == "__main__":
    _child()
