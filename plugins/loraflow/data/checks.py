"""Data checks: fail fast, before any GPU time, naming the rule, the count and the rows.

Column, type, null/blank rules are a pandera schema validated lazily on the frame as read
(every failure collected, not just the first); the content rules (message structure,
duplicates, token length against ``max_seq_length`` through the base model's fast
tokenizer, train/eval leakage) come from one pass over the file's ``Rows``.
``data_report.json`` is written whatever the outcome.
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

from loraflow.data import keys, read
from loraflow.errors import DataCheckError
from loraflow_trainer import contract

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
        raise DataCheckError(
            f"{path.name} failed {len(failed)} data check(s): " + " | ".join(r.message() for r in failed)
        )
    return report


def _run_rules(path, data_format, max_seq_length, min_rows, tokenizer_json, eval_path, report) -> list[RuleResult]:
    rows = read.rows(path, data_format)
    report["rows"] = int(len(rows))
    report["columns"] = [str(c) for c in rows.frame.columns]
    if len(rows) == 0:  # a header, blank lines or nothing: the rules below have no row to judge
        return [
            RuleResult(
                "empty_dataset", False, 0, [], f"{path.name} has no data rows; give the run a file with rows in it"
            )
        ]
    results = _schema_rules(rows.frame, data_format)
    if any(r.rule in ("missing_columns", "extra_columns", "wrong_type") for r in results):
        return results  # the content rules below need the right columns
    results.append(
        RuleResult(
            "min_rows",
            len(rows) >= min_rows,
            max(0, min_rows - len(rows)),
            [],
            f"the dataset has {len(rows)} rows, fewer than min_rows={min_rows}; add data or lower min_rows",
        )
    )
    scan = _Scan(rows, digests=True, normalised=eval_path is not None)
    if rows.is_chat:
        results.append(_messages_rule(rows, scan))
    results.append(_duplicates_rule(rows.lines[scan.duplicate]))
    usable = np.flatnonzero(scan.usable)
    if tokenizer_json is not None and tokenizer_json.exists() and len(usable):
        lengths, report["token_lengths"] = _measure_lengths(_Texts(rows, scan, usable), tokenizer_json, max_seq_length)
        results.append(_length_rule(lengths, rows.lines[usable], max_seq_length, report["token_lengths"]["max"]))
    else:
        report["token_lengths"] = None
        report["notes"] = [
            "token length not checked: no local tokenizer.json for the base model (the trainer truncates)"
        ]
    if eval_path is not None:
        results.extend(_eval_rules(scan.usable_norm(), eval_path, data_format))
    return results


class _Scan:
    """One pass over the rows' parts: which rows are usable (have a key), which repeat an
    earlier usable row, chat's malformed rows and message counts, each row's UTF-8 size and
    (for the leakage rule) normalised key. Every slice's intermediates are dropped in turn."""

    def __init__(self, rows: read.Rows, *, digests: bool, normalised: bool) -> None:
        seen = keys.FirstSeen()
        usable, duplicate, bad, nbytes, turns, norm = [], [], [], [], [], []
        for part in rows.parts():
            usable.append(part.usable)
            nbytes.append(part.nbytes())
            if rows.is_chat:
                bad.append(part.bad())
                turns.append(part.turns)
            if digests:
                dup = np.zeros(part.n, dtype=bool)
                dup[part.usable] = ~seen.first(keys.digests(part.keys())[part.usable])
                duplicate.append(dup)
            if normalised:
                norm.append(part.normalised_keys())
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
        self.usable, self.duplicate, self.bad = cat(usable, bool), cat(duplicate, bool), cat(bad, bool)
        self.nbytes, self.turns = cat(nbytes, np.int64), cat(turns, np.int64)
        self.norm = pa.chunked_array(norm, type=pa.large_string()) if normalised else None

    def usable_norm(self):
        """The normalised keys of the usable rows (what an eval row must not repeat)."""
        return self.norm.filter(pa.array(self.usable))


# --- Schema rules (pandera) ------------------------------------------------------------------------------


def _schema(data_format: str) -> pandera.DataFrameSchema:
    not_blank = pandera.Check(lambda s: s.astype(str).str.strip().str.len() > 0, name="not_blank")
    # messages may be a list of objects (JSONL, Parquet list) or its JSON text (CSV, a Parquet
    # string column): no dtype here, the messages rule reads every cell either way.
    chat = data_format == "chat"
    cols = {
        c: pandera.Column(None if chat else str, nullable=False, checks=None if chat else [not_blank])
        for c in contract.FORMAT_COLUMNS[data_format]
    }
    return pandera.DataFrameSchema(cols, strict=True, coerce=False)


# pandera's check -> (our rule, the fix); "dtype(...)" failures become wrong_type (_type_rules).
_RULES = {
    "column_in_schema": ("extra_columns", "drop the extra column(s) or pick the data_format they belong to"),
    "column_in_dataframe": ("missing_columns", "add the missing column(s) or pick the matching data_format"),
    "not_nullable": ("null_text", "fill or drop the empty/null rows"),
    "not_blank": ("blank_text", "drop rows whose text is only whitespace"),
}


def _schema_view(df: pd.DataFrame) -> pd.DataFrame:
    """What pandera sees: an Arrow list<struct> messages column (the JSONL reader's) stands in
    as the object column it used to be, one shared placeholder per non-null row, so the
    schema rules and their verdicts are unchanged without a Python dict per message."""
    arrow_cols = [
        c
        for c in df.columns
        if isinstance(df[c].dtype, pd.ArrowDtype) and read.is_messages_type(df[c].dtype.pyarrow_dtype)
    ]
    if not arrow_cols:
        return df
    view = {}
    for c in df.columns:
        if c in arrow_cols:
            col = np.full(len(df), _PRESENT, dtype=object)
            col[df[c].isna().to_numpy()] = None
            view[c] = pd.Series(col, index=df.index, dtype=object)
        else:
            view[c] = df[c]
    return pd.DataFrame(view, index=df.index, copy=False)


class _Present:
    def __repr__(self) -> str:
        return "[...]"


_PRESENT = _Present()


def _schema_rules(df: pd.DataFrame, data_format: str) -> list[RuleResult]:
    try:
        _schema(data_format).validate(_schema_view(df), lazy=True)
        return []
    except pandera.errors.SchemaErrors as exc:
        fc = exc.failure_cases
    results = []
    typed = False
    for check, group in fc.groupby(fc["check"].astype(str), sort=False):
        if check.startswith("dtype"):
            if not typed:
                results.extend(_type_rules(df, data_format))
                typed = True
            continue
        name, detail = _RULES.get(check, (check.split("(")[0], "fix the data"))
        idx = [int(i) for i in group["index"].dropna().tolist()[:MAX_EXAMPLES]]
        if name in ("extra_columns", "missing_columns"):
            detail = f"{', '.join(str(c) for c in group['failure_case'].head(MAX_EXAMPLES).tolist())}: {detail}"
        results.append(RuleResult(name, False, len(group), idx, detail))
    return results


def _type_rules(df: pd.DataFrame, data_format: str) -> list[RuleResult]:
    """wrong_type per column: which rows hold something other than text, and what they hold."""
    out = []
    for col in contract.FORMAT_COLUMNS[data_format]:
        if col not in df.columns:
            continue
        s = df[col]
        if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
            continue
        if pd.api.types.is_object_dtype(s.dtype):
            notna = s.notna().to_numpy()
            is_str = s.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
            bad = notna & ~is_str
            kinds = sorted({type(v).__name__ for v in s[bad].head(1000).tolist()})
        else:
            bad = s.notna().to_numpy()
            kinds = [str(s.dtype)]
        if not bad.any():
            continue
        rows = df.index[bad].tolist()
        examples = ", ".join(repr(v)[:40] for v in s[bad].head(3).tolist())
        out.append(
            RuleResult(
                "wrong_type",
                False,
                len(rows),
                rows[:MAX_EXAMPLES],
                f"column {col!r} holds {'/'.join(kinds)} values, not text (e.g. {examples}); "
                "store every value of it as a string (quote numbers and booleans in the file)",
            )
        )
    return out


# --- Content rules ---------------------------------------------------------------------------------------

_MESSAGES_DETAIL = (
    "each row needs a JSON list of {role, content} with roles system/user/assistant/tool, "
    "non-empty content and at least one assistant turn"
)


def _messages_rule(rows: read.Rows, scan: _Scan) -> RuleResult:
    bad = rows.lines[scan.bad].tolist()
    return RuleResult("malformed_messages", not bad, len(bad), bad[:MAX_EXAMPLES], _MESSAGES_DETAIL)


def _duplicates_rule(lines: pd.Index) -> RuleResult:
    rows = lines.tolist()
    return RuleResult(
        "duplicates",
        not rows,
        len(rows),
        rows[:MAX_EXAMPLES],
        "remove the repeated rows (preprocessing would drop them and skew the row count)",
    )


class _Texts:
    """The text each usable row is tokenized as, built only for the rows asked for (a list
    of 1M Python strings was the data check's largest allocation), with its UTF-8 byte
    length and the tokens its format adds. ``rows``: positions of the usable rows."""

    def __init__(self, rows: read.Rows, scan: _Scan, usable: np.ndarray) -> None:
        self._rows, self.rows, self.n = rows, usable, len(usable)
        self._nbytes = scan.nbytes[usable]
        self.overhead = (
            1 + _OVERHEAD["chat_per_message"] * scan.turns[usable]
            if rows.is_chat
            else np.full(self.n, _OVERHEAD[rows.format], dtype=np.int64)
        )

    def nbytes(self) -> np.ndarray:
        return self._nbytes

    def take(self, idx: np.ndarray) -> list[str]:
        return self._rows.texts(self.rows[idx])


def token_lengths(
    texts: _Texts, idx: np.ndarray, tokenizer_json: Path, chunk: int = 10_000, chunk_bytes: int = 1 << 20
) -> np.ndarray:
    """Exact token counts of rows ``idx``, encoded in chunks (at most ``chunk`` rows and about
    ``chunk_bytes`` of text) so only one chunk's texts and encodings live at a time (an
    Encoding costs ~50x its text in memory: 10k of the longest rows held ~300 MB)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = np.empty(len(idx), dtype=np.int64)
    sizes = texts.nbytes()[idx] if len(idx) else np.zeros(0, dtype=np.int64)
    start = 0
    while start < len(idx):
        room = int(np.searchsorted(np.cumsum(sizes[start : start + chunk]), chunk_bytes))
        stop = min(start + chunk, len(idx), start + 1 + room)
        out[start:stop] = [len(e) for e in encode(texts.take(idx[start:stop]), add_special_tokens=False)]
        start = stop
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
        return isinstance(pre, dict) and (
            pre.get("type") == "ByteLevel" or any(byte_level(x) for x in pre.get("pretokenizers") or [])
        )

    return (
        model.get("type") == "BPE"
        and spec.get("normalizer") is None
        and (byte_level(spec.get("pre_tokenizer")) or bool(model.get("byte_fallback")))
    )


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
    stats = _stats(
        sampled,
        len(todo),
        len(sample),
        f"{len(candidates)} row(s) whose UTF-8 length could exceed "
        f"max_seq_length tokenized exactly; the distribution is from a {len(sample)}-row sample",
    )
    stats["max"] = int(measured.max())
    return lengths, stats


def _stats(lengths: np.ndarray, tokenized: int, sampled: int, method: str) -> dict[str, Any]:
    return {
        "max": int(lengths.max()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "mean": float(lengths.mean()),
        "rows_tokenized": int(tokenized),
        "sampled_rows": int(sampled),
        "method": method,
    }


def _length_rule(lengths: np.ndarray, index: pd.Index, max_seq_length: int, longest: int) -> RuleResult:
    rows = index[lengths > max_seq_length].tolist()
    return RuleResult(
        "too_long",
        not rows,
        len(rows),
        rows[:MAX_EXAMPLES],
        f"these exceed max_seq_length={max_seq_length} tokens (longest {longest}); "
        "raise max_seq_length or shorten/drop them",
    )


def _eval_rules(train_norm, eval_path: Path, data_format: str) -> list[RuleResult]:
    """The separate eval file: the same schema rules (named eval_*), then leakage from train."""
    ev = read.rows(eval_path, data_format)
    if len(ev) == 0:  # the trainer refuses an empty eval set
        return [
            RuleResult(
                "eval_empty_dataset",
                False,
                0,
                [],
                f"{eval_path.name} has no data rows; give eval_dataset_path "
                "a file with rows in it, or leave it empty to hold out eval_fraction of the data",
            )
        ]
    schema_rules = _schema_rules(ev.frame, data_format)
    for r in schema_rules:
        r.rule, r.detail = f"eval_{r.rule}", f"in {eval_path.name}: {r.detail}"
    if schema_rules:
        return schema_rules
    scan = _Scan(ev, digests=False, normalised=True)
    if ev.is_chat:
        bad = _messages_rule(ev, scan)
        if not bad.passed:
            bad.rule, bad.detail = "eval_malformed_messages", f"in {eval_path.name}: {bad.detail}"
            return [bad]
    leaked = pc.fill_null(pc.is_in(scan.norm, value_set=train_norm), False).to_numpy(zero_copy_only=False)
    rows = ev.lines[leaked].tolist()
    return [
        RuleResult(
            "train_eval_leakage",
            not rows,
            len(rows),
            rows[:MAX_EXAMPLES],
            f"these rows of {eval_path.name} also appear (ignoring case/spacing) in the training data; "
            "remove them from one side",
        )
    ]


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        contract.atomic_write_json(path, report)
