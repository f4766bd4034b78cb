"""A tiny Llama-architecture model built in code, for tests and the demo.

Random weights and a byte-level BPE tokenizer trained on the given texts, saved with
``save_pretrained`` to a local directory, with a chat template. Nothing is downloaded, and
the result is deterministic for a given seed and corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

# Role markers are single special tokens so a chat turn's boundaries tokenize the same
# whatever text surrounds them (which keeps assistant-only masks exact).
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def corpus_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every string value of every row of the given JSONL/CSV/Parquet/text files."""
    import pandas as pd

    for path in paths:
        path = Path(path)
        if path.suffix in {".jsonl", ".json"}:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".csv":
            rows = pd.read_csv(path).to_dict("records")
        elif path.suffix == ".parquet":
            rows = pd.read_parquet(path).to_dict("records")
        else:
            yield path.read_text()
            continue
        for row in rows:
            yield from _strings(row)


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def build_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no carriage-return bars in logs

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        list(texts) or ["hello world"],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    # Like Llama's tokenizer, plain encoding prepends <s>, so a prompt sent to the served
    # model starts the way training examples do.
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # A frozen random head with the usual 0.02 init caps logits near uniform at this
        # width, so LoRA could barely lower the loss; a wider init keeps the toy learnable.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # safetensors writes 0600; a model cache is shared read-only with the (non-root) trainer.
    for path in out_dir.iterdir():
        path.chmod(0o644)
    return out_dir
