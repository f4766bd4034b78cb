"""Preprocessing: normalise a checked dataset into the training format and fingerprint it.

CSV/JSONL/Parquet in; ``data/train.parquet`` and ``data/eval.parquet`` out with the
normalised columns (text | prompt, completion | messages as a JSON string), duplicates
dropped, and a train/eval split chosen by a hash of each row's normalised content, so the
split does not depend on row order and near-duplicates never straddle it. The
fingerprint hashes the normalised data and the job spec: the same data and settings give
the same fingerprint, which is how scheduled runs know they have nothing new to train.

The file's ``Rows`` are read once and passed over once: each part's key, output table and
normalised key are built, used and dropped in turn.
"""

from __future__ import annotations

import binascii
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loraflow.data import keys, read
from loraflow.errors import DataCheckError
from loraflow_trainer import contract
from loraflow_trainer.spec import JobSpec


@dataclass(frozen=True)
class Preprocessed:
    fingerprint: str
    train_rows: int
    eval_rows: int
    dropped_duplicates: int


class _Kept:
    """One file's rows with each repeat of an earlier row dropped, part by part: the part's
    output table and (``with_norm``) normalised keys; the sha256 of every kept row's key
    (salted with ``prefix``, which says which file a row came from) gathers in ``digests``."""

    def __init__(self, rows: read.Rows, prefix: bytes = b"") -> None:
        self.rows, self.prefix = rows, prefix
        self.digests: list[np.ndarray] = []
        self.dropped = 0

    def tables(self, with_norm: bool) -> Iterator[tuple[pa.Table, Any]]:
        seen = keys.FirstSeen()
        for part in self.rows.parts():
            part_keys = part.keys()
            digest = keys.digests(part_keys, self.prefix)
            keep = seen.first(digest)
            self.digests.append(digest[keep])
            self.dropped += int((~keep).sum())
            mask = pa.array(keep)
            yield part.table(part_keys).filter(mask), (part.normalised_keys().filter(mask) if with_norm else None)

    def hex_digests(self) -> np.ndarray:
        return _hex(np.concatenate(self.digests) if self.digests else np.zeros((0, 32), dtype=np.uint8))


def preprocess(
    source: Path, job: JobSpec, workspace: Path, eval_fraction: float, eval_source: Path | None = None
) -> Preprocessed:
    fmt = job.data.data_format
    train = _Kept(read.rows(source, fmt))
    train_out = _ParquetOut(workspace / contract.TRAIN_FILE, fmt)
    eval_out = _ParquetOut(workspace / contract.EVAL_FILE, fmt) if job.data.eval_path else None
    try:
        n_train, n_eval, buckets, hexes, extra = _write_split(
            train, train_out, eval_out, fmt, eval_fraction, eval_source
        )
    except BaseException:
        for out in (train_out, eval_out):  # no half-written temporary file is left behind
            if out is not None:
                out.abort()
        raise
    try:
        _refuse_untrainable_split(job, n_train, n_eval, eval_out is not None, eval_fraction, eval_source, buckets)
    except DataCheckError:
        for out in (train_out, eval_out):  # nothing that looks like trainable data is left behind
            if out is not None:
                out.path.unlink(missing_ok=True)
        raise
    fingerprint = _fingerprint(hexes, extra, job.spec_hash())
    contract.atomic_write_json(
        workspace / contract.DATASET_SCHEMA_FILE, dataset_schema(train_out.columns, fmt, source, n_train, n_eval)
    )
    result = Preprocessed(fingerprint, n_train, n_eval, train.dropped)
    record = {"fingerprint": fingerprint, "spec_hash": job.spec_hash(), **result.__dict__}
    contract.atomic_write_json(workspace / contract.FINGERPRINT_FILE, record)
    # The trainer records the fingerprint in metadata.json: put it in the spec it reads.
    job.model_copy(update={"data_fingerprint": fingerprint}).write(workspace / contract.JOB_FILE)
    return result


def _write_split(
    train: _Kept,
    train_out: _ParquetOut,
    eval_out: _ParquetOut | None,
    fmt: str,
    eval_fraction: float,
    eval_source: Path | None,
):
    """Write the kept rows to train (and eval): the eval file's rows, or the hash split's share.
    Returns (train rows, eval rows, split buckets, row hashes, extra fingerprint lines)."""
    n_eval = 0
    buckets = []
    if eval_source is not None:
        for table, _ in train.tables(with_norm=False):
            train_out.write(table)
        ev = _Kept(read.rows(eval_source, fmt), prefix=b"eval\x1f")
        for table, _ in ev.tables(with_norm=False):
            n_eval += table.num_rows
            if eval_out is not None:
                eval_out.write(table)
        # Which file a row came from is part of the data: moving a row across changes the fingerprint.
        hexes, extra = np.concatenate([train.hex_digests(), ev.hex_digests()]), []
    else:
        for table, norm in train.tables(with_norm=True):
            bucket = keys.split_bucket(norm)
            buckets.append(bucket)
            is_eval = pa.array(bucket < eval_fraction)
            train_out.write(table.filter(pc.invert(is_eval)))
            ev_part = table.filter(is_eval)
            n_eval += ev_part.num_rows
            if eval_out is not None:
                eval_out.write(ev_part)
        # The split depends on eval_fraction, which is not in the job spec: hash it too.
        hexes, extra = train.hex_digests(), [f"eval_fraction={eval_fraction!r}"]
    n_train = train_out.close()
    if eval_out is not None:
        eval_out.close()
    return n_train, n_eval, buckets, hexes, extra


def _refuse_untrainable_split(
    job: JobSpec,
    n_train: int,
    n_eval: int,
    has_eval: bool,
    eval_fraction: float,
    eval_source: Path | None,
    buckets: list[np.ndarray],
) -> None:
    """Raise DataCheckError for a split the trainer would refuse (exit 3) or could not fill one batch with.

    The split keeps rows that differ only in case and spacing together, so a dataset of such
    variants lands whole on one side: the message says how many distinct contents it has.
    """
    batch = job.training.per_device_train_batch_size
    rows = n_train + (n_eval if eval_source is None else 0)
    distinct = int(len(np.unique(np.concatenate(buckets)))) if buckets else None
    why = (
        f"; the {rows} row(s) hold only {distinct} distinct content(s) ignoring case and spacing, and such rows "
        "always land on the same side of the split"
        if distinct is not None and distinct < rows
        else ""
    )
    if n_train == 0:
        raise DataCheckError(
            f"rule train_split_empty: no row is left for training after deduplication and the "
            f"train/eval split (eval_fraction={eval_fraction}){why}; add distinct rows or lower eval_fraction"
        )
    if n_train < batch:
        raise DataCheckError(
            f"rule train_split_too_small: the train split has {n_train} row(s), fewer than one batch "
            f"(per_device_train_batch_size={batch}){why}; add rows, lower per_device_train_batch_size "
            "or lower eval_fraction"
        )
    if has_eval and n_eval == 0:
        where = (
            f"the eval file {eval_source.name} has no row left after deduplication"
            if eval_source is not None
            else f"no row fell in the eval split (eval_fraction={eval_fraction}){why}"
        )
        raise DataCheckError(
            f"rule eval_split_empty: {where}, and the trainer refuses an empty eval set; "
            "add rows, raise eval_fraction, or set eval_fraction to 0 to train without eval loss"
        )


def dataset_schema(columns, data_format: str, source: Path, train_rows: int, eval_rows: int) -> dict[str, Any]:
    return {
        "data_format": data_format,
        "source": str(source),
        "columns": [{"name": c, "type": "string", "role": data_format} for c in columns],
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "split": "blake2b(normalised content) < eval_fraction",
    }


def _hex(digest: np.ndarray) -> np.ndarray:
    """(n, 32) digests as an (n,) array of 64-byte lowercase hex strings (``hexdigest()``)."""
    return np.frombuffer(binascii.hexlify(np.ascontiguousarray(digest).tobytes()), dtype="S64")


def _fingerprint(hexes: np.ndarray, extra: list[str], spec_hash: str) -> str:
    """sha256 of the sorted row hashes (and ``extra`` lines) one per line, then the spec hash:
    ``sha256(("\\n".join(sorted(lines)) + "\\n" + spec_hash).encode())``, without a Python
    string per row or the joined text."""
    hexes = np.sort(hexes)
    lines = np.empty((len(hexes), 65), dtype=np.uint8)
    lines[:, :64] = hexes.view(np.uint8).reshape(-1, 64)
    lines[:, 64] = ord("\n")
    cuts = sorted((int(np.searchsorted(hexes, e.encode(), side="left")), e) for e in extra)
    h = hashlib.sha256()
    start = 0
    for at, text in cuts + [(len(hexes), None)]:
        for s in range(start, at, read.CHUNK):
            h.update(lines[s : min(at, s + read.CHUNK)].tobytes())
        if text is not None:
            h.update((text + "\n").encode())
        start = at
    h.update(spec_hash.encode())
    return h.hexdigest()


class _ParquetOut:
    """A Parquet file written slice by slice (one row group per slice), in place only on close
    (under ``contract.atomic_write``'s temporary name), with the schema ``pa.Table.from_pandas``
    gave the whole frame (pandas metadata included)."""

    def __init__(self, path: Path, data_format: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.columns = contract.FORMAT_COLUMNS[data_format]
        empty = pd.DataFrame({c: pd.Series([], dtype="str") for c in self.columns})
        self.schema = pa.Table.from_pandas(empty, preserve_index=False).schema
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table.cast(self.schema))
            self.rows += table.num_rows

    def close(self) -> int:
        self.writer.close()
        self.tmp.replace(self.path)
        return self.rows

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)
