"""Preprocessing: normalise a checked dataset into the training format and fingerprint it.

CSV/JSONL/Parquet in; ``data/train.parquet`` and ``data/eval.parquet`` out with the
normalised columns (text | prompt, completion | messages as a JSON string), duplicates
dropped, and a train/eval split chosen by a hash of each row's normalised content, so the
split does not depend on row order and near-duplicates never straddle it. The
fingerprint hashes the normalised data and the job spec: the same data and settings give
the same fingerprint, which is how scheduled runs know they have nothing new to train.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loraflow import dataset
from loraflow_trainer.spec import JobSpec


@dataclass(frozen=True)
class Preprocessed:
    fingerprint: str
    train_rows: int
    eval_rows: int
    dropped_duplicates: int


def normalised_frame(df: pd.DataFrame, data_format: str, parsed: list | None = None) -> pd.DataFrame:
    if data_format == "chat":
        parsed = dataset.parse_messages(df) if parsed is None else parsed
        return pd.DataFrame({"messages": dataset.chat_keys(parsed)})
    cols = dataset.FORMAT_COLUMNS[data_format]
    return pd.DataFrame({c: df[c].astype(str).reset_index(drop=True) for c in cols})


def preprocess(source: Path, job: JobSpec, workspace: Path, eval_fraction: float, eval_source: Path | None = None) -> Preprocessed:
    fmt = job.data.data_format
    df = dataset.read(source)
    if fmt == "chat":  # parse the messages once; keys, normalised keys and the output all come from it
        parsed = dataset.parse_messages(df)
        keys = pd.Series(dataset.chat_keys(parsed), index=df.index, dtype=object)
        keep = ~keys.duplicated(keep="first").to_numpy()
        parsed = [m for m, k in zip(parsed, keep) if k]
        df, keys = df[keep], keys[keep]
        norm = pd.Series(dataset.chat_normalised_keys(parsed), index=df.index, dtype=object)
        del parsed
        out = pd.DataFrame({"messages": keys.to_numpy()})  # the canonical JSON the key already is
    else:
        keys = dataset.keys(df, fmt)
        keep = ~keys.duplicated(keep="first").to_numpy()
        df, keys = df[keep], keys[keep]
        norm = dataset.normalised_keys(df, fmt)
        out = normalised_frame(df, fmt)
    if eval_source is not None:
        ev = dataset.read(eval_source)
        ev_keys = dataset.keys(ev, fmt)
        ev_keep = ~ev_keys.duplicated(keep="first").to_numpy()
        ev, ev_keys = ev[ev_keep], ev_keys[ev_keep]
        train, evaluation = out, normalised_frame(ev, fmt)
        # Which file a row came from is part of the data: moving a row across changes the fingerprint.
        row_hashes = _hashes(keys) + _hashes("eval\x1f" + ev_keys)
    else:
        is_eval = (dataset.split_bucket(norm) < eval_fraction).to_numpy()
        train, evaluation = out[~is_eval], out[is_eval]
        # The split depends on eval_fraction, which is not in the job spec: hash it too.
        row_hashes = _hashes(keys) + [f"eval_fraction={eval_fraction!r}"]
    data_dir = workspace / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_parquet(train, data_dir / "train.parquet")
    if job.data.eval_path:
        _write_parquet(evaluation, data_dir / "eval.parquet")
    fingerprint = hashlib.sha256(("\n".join(sorted(row_hashes)) + "\n" + job.spec_hash()).encode()).hexdigest()
    schema = dataset_schema(train, fmt, source, len(train), len(evaluation))
    _write_json(workspace / "dataset_schema.json", schema)
    result = Preprocessed(fingerprint, len(train), len(evaluation), int((~keep).sum()))
    _write_json(workspace / "fingerprint.json", {"fingerprint": fingerprint, "spec_hash": job.spec_hash(), **result.__dict__})
    # The trainer records the fingerprint in metadata.json: put it in the spec it reads.
    job.model_copy(update={"data_fingerprint": fingerprint}).write(workspace / "job.json")
    return result


def dataset_schema(df: pd.DataFrame, data_format: str, source: Path, train_rows: int, eval_rows: int) -> dict[str, Any]:
    return {
        "data_format": data_format,
        "source": str(source),
        "columns": [{"name": c, "type": "string", "role": data_format} for c in df.columns],
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "split": "blake2b(normalised content) < eval_fraction",
    }


def _hashes(keys: pd.Series) -> list[str]:
    sha = hashlib.sha256
    out: list[str] = []
    for start in range(0, len(keys), dataset.CHUNK):  # Python strings for one chunk at a time
        out.extend(sha(k.encode()).hexdigest() for k in keys.iloc[start:start + dataset.CHUNK].tolist())
    return out


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(path)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
