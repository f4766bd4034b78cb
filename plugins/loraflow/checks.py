"""Data checks: fail fast, before any GPU time, naming the rule, the count and the rows.

Column, type, null/blank and duplicate rules are a pandera schema validated lazily (every
failure collected, not just the first); message structure, token length against
``max_seq_length`` (the base model's fast tokenizer, through ``tokenizers``) and
train/eval leakage are checked here. ``data_report.json`` is written whatever the outcome.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pandera
import pyarrow as pa
import pyarrow.compute as pc

from loraflow import dataset
from loraflow.errors import DataCheckError

MAX_EXAMPLES = 5
# Tokens a format adds around the content (bos/eos, role markers): an upper bound is fine,
# the check is there to catch rows that would be silently truncated.
_OVERHEAD = {"text": 2, "prompt_completion": 2, "chat_per_message": 3}


@dataclass
class RuleResult:
    rule: str
    passed: bool
    count: int = 0
    rows: list[int] = field(default_factory=list)
    detail: str = ""

    def message(self) -> str:
        where = f" (first rows/lines: {', '.join(map(str, self.rows))})" if self.rows else ""
        return f"rule {self.rule}: {self.count} row(s) fail{where}; {self.detail}"


def _schema(data_format: str) -> pandera.DataFrameSchema:
    not_blank = pandera.Check(lambda s: s.astype(str).str.strip().str.len() > 0, name="not_blank")
    cols = {c: pandera.Column(object if data_format == "chat" else str, nullable=False,
                         checks=None if data_format == "chat" else [not_blank])
            for c in dataset.FORMAT_COLUMNS[data_format]}
    return pandera.DataFrameSchema(cols, strict=True, coerce=False)


_FIXES = {
    "column_in_schema": "drop the extra column(s) or pick the data_format they belong to",
    "column_in_dataframe": "add the missing column(s) or pick the matching data_format",
    "not_nullable": "fill or drop the empty/null rows",
    "not_blank": "drop rows whose text is only whitespace",
    "dtype": "store these columns as strings",
}


def _pandera_rules(df: pd.DataFrame, data_format: str) -> list[RuleResult]:
    try:
        _schema(data_format).validate(df, lazy=True)
        return []
    except pandera.errors.SchemaErrors as exc:
        fc = exc.failure_cases
    results = []
    for check, group in fc.groupby(fc["check"].astype(str), sort=False):
        name = check.split("(")[0].replace("dtype", "dtype")
        if check.startswith("dtype"):
            name = "wrong_type"
        elif check in ("not_nullable",):
            name = "null_text"
        elif check == "not_blank":
            name = "blank_text"
        elif check == "column_in_schema":
            name = "extra_columns"
        elif check == "column_in_dataframe":
            name = "missing_columns"
        idx = [int(i) for i in group["index"].dropna().tolist()[:MAX_EXAMPLES]]
        cases = ", ".join(str(c) for c in group["failure_case"].head(MAX_EXAMPLES).tolist())
        detail = _FIXES.get(check if not check.startswith("dtype") else "dtype", "fix the data")
        if name in ("extra_columns", "missing_columns", "wrong_type"):
            detail = f"{cases}: {detail}"
        results.append(RuleResult(name, False, len(group), idx, detail))
    return results


def _messages_rule(df: pd.DataFrame) -> tuple[RuleResult, pd.Series]:
    parsed = pd.Series(dataset.parse_messages(df), index=df.index, dtype=object)

    def bad(m):
        return (m is None or any(x["role"] not in dataset.ROLES or not x["content"].strip() for x in m)
                or not any(x["role"] == "assistant" for x in m))
    mask = np.fromiter((bad(m) for m in parsed.tolist()), dtype=bool, count=len(parsed))
    rows = df.index[mask].tolist()
    return RuleResult("malformed_messages", not rows, len(rows), rows[:MAX_EXAMPLES],
                      "each row needs a JSON list of {role, content} with roles system/user/assistant/tool, "
                      "non-empty content and at least one assistant turn"), parsed


def _duplicates_rule(keys: pd.Series) -> RuleResult:
    dup = keys.duplicated(keep="first")
    rows = keys.index[dup.to_numpy()].tolist()
    return RuleResult("duplicates", not rows, len(rows), rows[:MAX_EXAMPLES],
                      "remove the repeated rows (preprocessing would drop them and skew the row count)")


class _Texts:
    """The text each row is tokenized as, built only for the rows asked for (a list of 1M
    Python strings was the data check's largest allocation), with its UTF-8 byte length
    for every row computed in Arrow."""

    def __init__(self, df: pd.DataFrame, data_format: str, parsed) -> None:
        self.n = len(df)
        if data_format == "chat":
            self._chat = [("".join(x["content"] for x in m) if m else "") for m in parsed.tolist()]
            self.overhead = np.fromiter((1 + _OVERHEAD["chat_per_message"] * len(m) if m else 0 for m in parsed.tolist()),
                                        dtype=np.int64, count=self.n)
            self._cols = None
        else:
            self._chat = None
            self._cols = [pa.array(df[c].astype(str)).cast(pa.large_string())  # Arrow-backed: no Python strings
                          for c in dataset.FORMAT_COLUMNS[data_format]]
            self.overhead = np.full(self.n, _OVERHEAD[data_format], dtype=np.int64)

    def nbytes(self) -> np.ndarray:
        if self._chat is not None:
            return pc.binary_length(pa.array(self._chat, type=pa.large_string())).to_numpy(zero_copy_only=False)
        return sum(pc.binary_length(c).to_numpy(zero_copy_only=False) for c in self._cols)

    def take(self, idx: np.ndarray) -> list[str]:
        if self._chat is not None:
            return [self._chat[i] for i in idx]
        cols = [c.take(pa.array(idx)).to_pylist() for c in self._cols]
        return cols[0] if len(cols) == 1 else [a + b for a, b in zip(*cols)]


def token_lengths(texts: _Texts, idx: np.ndarray, tokenizer_json: Path, chunk: int = 10_000) -> np.ndarray:
    """Exact token counts of rows ``idx``, encoded in chunks so only one chunk's texts and
    encodings live at a time."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = np.empty(len(idx), dtype=np.int64)
    for start in range(0, len(idx), chunk):
        out[start:start + chunk] = [len(e) for e in encode(texts.take(idx[start:start + chunk]), add_special_tokens=False)]
    return out


def tokens_at_most_bytes(tokenizer_json: Path) -> bool:
    """Whether the tokenizer can never produce more tokens than a text has UTF-8 bytes (+1).

    True for byte-level BPE (GPT-2, Llama 3, Mistral Nemo...) and byte-fallback BPE with no
    normalizer: each token covers at least one byte. Anything else (WordPiece, Unigram, a
    normalizer that may expand text) is tokenized in full.
    """
    spec = json.loads(Path(tokenizer_json).read_text())
    model = spec.get("model") or {}

    def byte_level(pre) -> bool:
        return isinstance(pre, dict) and (pre.get("type") == "ByteLevel" or any(byte_level(x) for x in pre.get("pretokenizers") or []))

    return (model.get("type") == "BPE" and spec.get("normalizer") is None
            and (byte_level(spec.get("pre_tokenizer")) or bool(model.get("byte_fallback"))))


SAMPLE_ROWS = 10_000


def _measure_lengths(texts: _Texts, tokenizer_json: Path, max_seq_length: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(lengths that may exceed max_seq_length with their positions, report stats).

    With a tokenizer that never yields more tokens than bytes, only rows whose byte length
    plus overhead exceeds max_seq_length can be too long, and only those are tokenized;
    the distribution in the report comes from a fixed-seed sample of SAMPLE_ROWS rows (all
    rows when there are fewer) plus those candidates.
    """
    n, overhead = texts.n, texts.overhead
    if n <= SAMPLE_ROWS or not tokens_at_most_bytes(tokenizer_json):
        lengths = token_lengths(texts, np.arange(n), tokenizer_json) + overhead
        return lengths, _stats(lengths, n, n, "all rows tokenized")
    candidates = np.flatnonzero(texts.nbytes() + 1 + overhead > max_seq_length)
    sample = np.random.default_rng(0).choice(n, SAMPLE_ROWS, replace=False)
    todo = np.union1d(candidates, sample)
    measured = token_lengths(texts, todo, tokenizer_json) + overhead[todo]
    lengths = np.zeros(n, dtype=np.int64)  # rows not tokenized cannot exceed the limit
    lengths[todo] = measured
    sampled = lengths[sample]
    stats = _stats(sampled, len(todo), len(sample), f"{len(candidates)} row(s) whose UTF-8 length could exceed "
                   f"max_seq_length tokenized exactly; the distribution is from a {len(sample)}-row sample")
    stats["max"] = int(measured.max())
    return lengths, stats


def _stats(lengths: np.ndarray, tokenized: int, sampled: int, method: str) -> dict[str, Any]:
    return {"max": int(lengths.max()), "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
            "mean": float(lengths.mean()), "rows_tokenized": int(tokenized), "sampled_rows": int(sampled), "method": method}


def _length_rule(lengths: np.ndarray, index: pd.Index, max_seq_length: int, longest: int) -> RuleResult:
    over = lengths > max_seq_length
    rows = index[over].tolist()
    return RuleResult("too_long", not rows, len(rows), rows[:MAX_EXAMPLES],
                      f"these exceed max_seq_length={max_seq_length} tokens (longest {longest}); "
                      "raise max_seq_length or shorten/drop them")


def check(
    path: Path,
    data_format: str,
    *,
    max_seq_length: int,
    min_rows: int,
    tokenizer_json: Path | None,
    eval_path: Path | None = None,
    report_path: Path | None = None,
) -> dict[str, Any]:
    """Run every rule; write the report; raise DataCheckError naming each failed rule."""
    started = time.perf_counter()
    report: dict[str, Any] = {"dataset": str(path), "data_format": data_format, "rules": []}
    try:
        results = _run_rules(path, data_format, max_seq_length, min_rows, tokenizer_json, eval_path, report)
    except DataCheckError as exc:
        report.update(passed=False, error=str(exc), seconds=time.perf_counter() - started)
        _write(report_path, report)
        raise
    failed = [r for r in results if not r.passed]
    report["rules"] = [r.__dict__ for r in results]
    report["passed"] = not failed
    report["seconds"] = time.perf_counter() - started
    _write(report_path, report)
    if failed:
        raise DataCheckError(f"{path.name} failed {len(failed)} data check(s): " + " | ".join(r.message() for r in failed))
    return report


def _run_rules(path, data_format, max_seq_length, min_rows, tokenizer_json, eval_path, report) -> list[RuleResult]:
    df = dataset.read(path)
    report["rows"] = int(len(df))
    report["columns"] = [str(c) for c in df.columns]
    results = _pandera_rules(df, data_format)
    structural = {"missing_columns", "extra_columns", "wrong_type"}
    if any(r.rule in structural for r in results):
        return results  # the content rules below need the right columns
    results.append(RuleResult("min_rows", len(df) >= min_rows, max(0, min_rows - len(df)), [],
                              f"the dataset has {len(df)} rows, fewer than min_rows={min_rows}; add data or lower min_rows"))
    bad_rows = set()
    for r in results:
        if r.rule in ("null_text", "blank_text"):
            bad_rows.update(r.rows)
    parsed = None
    usable = df
    if data_format == "chat":
        rule, parsed = _messages_rule(df)
        results.append(rule)
        usable = df[parsed.map(lambda m: m is not None).to_numpy()]
        parsed = parsed.loc[usable.index]
    else:
        usable = df.dropna(subset=list(dataset.FORMAT_COLUMNS[data_format]))
    if data_format == "chat":  # already parsed by the messages rule
        keys = pd.Series(dataset.chat_keys(parsed.tolist()), index=usable.index, dtype=object)
    else:
        keys = dataset.keys(usable, data_format)
    results.append(_duplicates_rule(keys))
    if tokenizer_json is not None and tokenizer_json.exists() and len(usable):
        lengths, report["token_lengths"] = _measure_lengths(_Texts(usable, data_format, parsed), tokenizer_json, max_seq_length)
        results.append(_length_rule(lengths, usable.index, max_seq_length, report["token_lengths"]["max"]))
    else:
        report["token_lengths"] = None
        report["notes"] = ["token length not checked: no local tokenizer.json for the base model (the trainer truncates)"]
    if eval_path is not None:
        train_norm = (pd.Series(dataset.chat_normalised_keys(parsed.tolist()), index=usable.index) if data_format == "chat"
                      else dataset.normalised_keys(usable, data_format))
        results.extend(_eval_rules(train_norm, eval_path, data_format))
    return results


def _eval_rules(train_norm: pd.Series, eval_path: Path, data_format: str) -> list[RuleResult]:
    """The separate eval file: the same schema rules (named eval_*), then leakage from train."""
    ev = dataset.read(eval_path)
    schema_rules = _pandera_rules(ev, data_format)
    for r in schema_rules:
        r.rule, r.detail = f"eval_{r.rule}", f"in {eval_path.name}: {r.detail}"
    if schema_rules:
        return schema_rules
    if data_format == "chat":
        bad, _ = _messages_rule(ev)
        if not bad.passed:
            bad.rule, bad.detail = "eval_malformed_messages", f"in {eval_path.name}: {bad.detail}"
            return [bad]
    return [_leakage_rule(train_norm, ev, eval_path, data_format)]


def _leakage_rule(train_norm: pd.Series, ev: pd.DataFrame, eval_path: Path, data_format: str) -> RuleResult:
    leaked = dataset.normalised_keys(ev, data_format).isin(set(train_norm))
    rows = ev.index[leaked.to_numpy()].tolist()
    return RuleResult("train_eval_leakage", not rows, len(rows), rows[:MAX_EXAMPLES],
                      f"these rows of {eval_path.name} also appear (ignoring case/spacing) in the training data; remove them from one side")


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
