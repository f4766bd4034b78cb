"""Greedy completions of prompts, encoded the way training examples start.

The trainer's ``samples.jsonl`` (each sample prompt before and after training) and
``evaluate``'s generation metrics both come from ``generate``.
"""

from __future__ import annotations

from typing import Any

import torch

from loraflow_trainer.data import encode_prompts, left_pad
from loraflow_trainer.spec import JobSpec


def generate(
    model,
    tokenizer,
    job: JobSpec,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int | None = None,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy completions, decoded without special tokens, in batches of ``batch_size`` (all at once by default).

    Prompts are left padded, so a batch generates as its prompts would alone; with
    ``max_prompt_tokens`` a longer prompt keeps its last tokens. The model is put in eval
    mode for the call and handed back in the mode it was in.
    """
    if not prompts:
        return []
    batch_size = batch_size or len(prompts)
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids = encode_prompts(job, prompts[i : i + batch_size], tokenizer)
            if max_prompt_tokens:
                ids = [x[-max_prompt_tokens:] for x in ids]
            padded, mask, width = left_pad(ids, tokenizer.pad_token_id)
            input_ids, attention_mask = torch.tensor(padded, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
            # no_grad, not inference_mode: a model still to be trained must not cache inference tensors.
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            outs.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outs


def sample_rows(prompts: list[str], before: list[str], after: list[str]) -> list[dict[str, Any]]:
    """The lines of samples.jsonl: each prompt with its completion before and after training."""
    before = before or [""] * len(after)
    return [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=True)]
