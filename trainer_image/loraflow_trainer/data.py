"""Training data: read a dataset file, tokenize it into examples, and collate batches.

Owns the three formats (text, prompt/completion, chat messages), the completion-only /
assistant-only label mask (-100 elsewhere), truncation to ``max_seq_length``, the
padding-free packing collator, and the recipe's data stage (``build_datasets``).
Tokenization is batched through the fast tokenizer; an example is a pair of int lists,
never a Python object per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow_trainer import contract, progress
from loraflow_trainer.errors import DataError
from loraflow_trainer.spec import JobSpec

IGNORE_INDEX = -100


def read_table(path: Path):
    """Read Parquet, JSONL or CSV into a DataFrame, or raise DataError naming the file."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"dataset {path} does not exist; check train_path/eval_path in the job spec")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix in {".jsonl", ".json"}:
            return pd.read_json(path, lines=True, dtype=False)
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False, dtype=str)
    except Exception as exc:  # pandas/pyarrow raise many types for a corrupt file
        raise DataError(
            f"dataset {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); fix or regenerate the file"
        ) from None
    raise DataError(f"dataset {path} has unsupported extension {path.suffix!r}; use .parquet, .jsonl or .csv")


def columns(job: JobSpec) -> list[str]:
    """The columns the job's format reads: the format's columns (``contract.FORMAT_COLUMNS``) under the
    names the job gives them (``<column>_column`` in its data section)."""
    return [getattr(job.data, f"{c}_column") for c in contract.FORMAT_COLUMNS[job.data.data_format]]


def _messages(value: Any, row: int, path: Path) -> list[dict[str, str]]:
    """One chat cell, parsed as the pipeline parses it, with an assistant turn to learn from."""
    try:
        messages = contract.parse_messages(value)
    except contract.MessagesError as exc:
        raise DataError(f"{path} row {row}: {exc}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{path} row {row}: the conversation has no assistant turn to learn from")
    return messages


def read_rows(job: JobSpec, path: Path) -> list:
    """The dataset's rows in the job's format, checked without a tokenizer.

    text -> list of str; prompt_completion -> list of (prompt, completion); chat -> list of
    message lists. Raises DataError naming the file (and row) for anything unusable.
    """
    df = read_table(path)
    if len(df) == 0:
        raise DataError(f"{path} has no rows; give the job a non-empty dataset")
    missing = [c for c in columns(job) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)} for data_format={job.data.data_format}; "
            f"it has {', '.join(map(str, df.columns))}"
        )
    d = job.data
    if d.data_format == "text":
        return _strings(df, d.text_column, path)
    if d.data_format == "prompt_completion":
        return list(zip(_strings(df, d.prompt_column, path), _strings(df, d.completion_column, path), strict=True))
    return [_messages(v, i, path) for i, v in enumerate(df[d.messages_column].tolist())]


def preflight(job: JobSpec, job_dir: Path) -> None:
    """Check train/eval data before any model loads: a bad file fails in seconds, not after a model download."""
    for p in (job.data.train_path, job.data.eval_path):
        path = job.resolve(p, job_dir)
        if path is not None:
            rows = read_rows(job, path)
            if p == job.data.train_path and job.privacy.dp_enabled:
                # On the rows here, before any model loads; the trainer checks again on the examples kept.
                t = job.training
                job.privacy.check_dataset(len(rows), t.per_device_train_batch_size * t.gradient_accumulation_steps)


def load_examples(job: JobSpec, path: Path, tokenizer) -> list[dict[str, list[int]]]:
    """Tokenize every row of ``path`` into ``{"input_ids", "labels"}``, truncated to max_seq_length."""
    rows = read_rows(job, path)
    fmt = job.data.data_format
    if fmt == "text":
        examples = _tokenize_text(rows, tokenizer)
    elif fmt == "prompt_completion":
        prompts, completions = zip(*rows, strict=True)
        examples = _tokenize_prompt_completion(list(prompts), list(completions), tokenizer, job.completion_only)
    else:
        examples = [_tokenize_chat(c, tokenizer, job.completion_only) for c in rows]
    limit = job.training.max_seq_length
    out = []
    for ex in examples:
        ids, labels = ex["input_ids"][:limit], ex["labels"][:limit]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise DataError(f"{path}: no example has a trainable token within max_seq_length={limit}; raise max_seq_length")
    return out


def _strings(df, column: str, path: Path) -> list[str]:
    """The column as strings; a null or non-text cell is an error (str(None) would train on "None")."""
    values = df[column].tolist()
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(
                f"{path} row {i}: column {column!r} holds {type(v).__name__} {v!r}, not text; "
                "fill or drop the row (the pipeline's check data step reports all such rows)"
            )
    return values


def _tokenize_text(texts: list[str], tokenizer) -> list[dict[str, list[int]]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    return [{"input_ids": bos + x + eos, "labels": bos + x + eos} for x in ids]


def _tokenize_prompt_completion(prompts, completions, tokenizer, completion_only: bool):
    # Tokenized separately so the boundary (and so the mask) is exact.
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    out = []
    for p, c in zip(p_ids, c_ids, strict=True):
        prefix = bos + p
        ids = prefix + c + eos
        labels = ([IGNORE_INDEX] * len(prefix) + c + eos) if completion_only else list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _tokenize_chat(messages, tokenizer, completion_only: bool) -> dict[str, list[int]]:
    if tokenizer.chat_template is None:
        raise DataError("data_format=chat needs a tokenizer with a chat template; the base model's tokenizer has none")
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    if not completion_only:
        return {"input_ids": ids, "labels": list(ids)}
    mask = enc.get("assistant_masks") or []
    if not any(mask):
        mask = _assistant_mask_by_prefix(messages, tokenizer, len(ids))
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]}


def _assistant_mask_by_prefix(messages, tokenizer, n: int) -> list[int]:
    """Assistant mask for templates without {% generation %} markers.

    The tokens an assistant turn adds are those between the conversation rendered up to
    its generation prompt and rendered through the turn itself.
    """

    def n_tokens(msgs, generation_prompt: bool) -> int:
        enc = tokenizer.apply_chat_template(
            msgs, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return len(enc["input_ids"])

    mask = [0] * n
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = n_tokens(messages[:i], True) if i else 0
        end = n_tokens(messages[: i + 1], False)
        for j in range(start, min(end, n)):
            mask[j] = 1
    return mask


def prompts_for_samples(job: JobSpec, path: Path, tokenizer, n: int) -> list[str]:
    """The first ``n`` prompts of ``path`` rendered as the model will see them at inference."""
    if n == 0:
        return []
    df = read_table(path).head(n)
    fmt = job.data.data_format
    if fmt == "prompt_completion":
        return df[job.data.prompt_column].astype(str).tolist()
    if fmt == "chat":
        out = []
        for i, v in enumerate(df[job.data.messages_column].tolist()):
            msgs = _messages(v, i, path)
            upto = next(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            out.append(tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=True))
        return out
    # Plain text: continue the first few words.
    return [" ".join(str(t).split()[:4]) for t in df[job.data.text_column].tolist()]


def encode_prompts(job: JobSpec, prompts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of sample prompts, starting the way training examples start.

    Chat prompts are rendered by the template, which writes its own BOS; plain prompts
    get the BOS that ``_tokenize_*`` prepends.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if job.data.data_format == "chat" or tokenizer.bos_token_id is None:
        return [list(x) for x in ids]
    return [[tokenizer.bos_token_id, *x] for x in ids]


@dataclass
class PaddingCollator:
    """Right-pads a batch to its longest example (dynamic padding)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackingCollator:
    """Padding-free packing: a batch becomes one row, position ids restart per example.

    With no attention mask, transformers derives a block-diagonal causal mask from the
    restarting position ids (``masking_utils.find_packed_sequence_indices``), and flash
    attention uses varlen kernels, so no token attends across examples. That detection
    is skipped when a KV cache is in play, so the batch turns the cache off itself. The first label
    of each example is -100 so no example learns to predict from its predecessor.
    """

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            ids.extend(f["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(f["labels"][1:])
            positions.extend(range(len(f["input_ids"])))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False,
        }


class ExampleDataset:
    """A list of tokenized examples as a map-style dataset (what Trainer expects)."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


@dataclass
class Datasets:
    """The data stage's result: tokenized train (and eval) examples, and the prompts samples are generated from."""

    train: ExampleDataset
    eval: ExampleDataset | None
    sample_prompts: list[str]


def build_datasets(job: JobSpec, job_dir: Path, tokenizer) -> Datasets:
    """Tokenize the job's train and eval files, and pick the sample prompts (eval rows first)."""
    d = job.data
    train = ExampleDataset(load_examples(job, job.resolve(d.train_path, job_dir), tokenizer))
    evaluation = None
    if d.eval_path:
        evaluation = ExampleDataset(load_examples(job, job.resolve(d.eval_path, job_dir), tokenizer))
    prompts: list[str] = []
    if d.eval_path or not job.privacy.dp_enabled:  # DP: never copy training prompts into samples.jsonl
        prompt_source = job.resolve(d.eval_path or d.train_path, job_dir)
        prompts = prompts_for_samples(job, prompt_source, tokenizer, job.evaluation.num_sample_generations)
    progress.emit(
        "data",
        train_examples=len(train),
        train_tokens=train.num_tokens(),
        eval_examples=len(evaluation) if evaluation else 0,
    )
    return Datasets(train, evaluation, prompts)


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Prompts padded on the left to one width for batched generation: (input ids, attention
    mask, width); generated tokens start at ``width`` in every row."""
    width = max(map(len, ids))
    return (
        [[pad_id] * (width - len(x)) + list(x) for x in ids],
        [[0] * (width - len(x)) + [1] * len(x) for x in ids],
        width,
    )
