"""Reading a dataset file once, into the ``Rows`` that the data checks and preprocessing share.

``rows`` parses CSV, JSONL or Parquet into a DataFrame indexed by each row's line number in
the file (so every error can point at a line a person can open); for chat, the messages
are parsed once more into one Arrow ``list<struct<role, content>>`` column (the JSONL
reader's own column as it is; any other cell through ``contract.parse_messages``).

Everything that depends on the format lives in the two views of a slice of rows,
``Columns`` (text, prompt/completion) and ``Chat`` (messages), which answer the same
questions: which rows are usable, each row's key (the content that makes two rows the
same example), its normalised key (the same ignoring case and spacing), the UTF-8 size of
the text it is tokenized as, and the table preprocessing writes. The checks and
preprocessing never branch on the format to rebuild any of these.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from loraflow.data.keys import PY_SPACES, as_large, fold_array, json_escape, large, take_pylist, text_array
from loraflow.errors import DataCheckError
from loraflow_trainer import contract

CHUNK = 50_000  # rows per slice where a slice's intermediates are built and dropped in turn
_MESSAGE = pa.struct([("role", pa.large_string()), ("content", pa.large_string())])


def rows(path: Path, data_format: str) -> Rows:
    """The file's rows, read once."""
    return Rows(read_frame(path), data_format)


class Rows:
    """A dataset file as read: ``frame`` (what the schema rules judge, indexed by line number)
    and, for the content rules and preprocessing, its format's view in ``CHUNK``-row parts."""

    def __init__(self, frame: pd.DataFrame, data_format: str) -> None:
        self.frame = frame
        self.format = data_format
        self.is_chat = data_format == "chat"
        self.columns = contract.FORMAT_COLUMNS[data_format]
        self._whole: list | None = None  # the format's columns as Arrow arrays, built once

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def lines(self) -> pd.Index:
        return self.frame.index

    def _arrays(self) -> list:
        """The messages (parsed) or the text columns, whole, as Arrow chunked arrays."""
        if self._whole is None:
            self._whole = (
                [_messages(self.frame["messages"])]
                if self.is_chat
                else [text_array(self.frame[c]) for c in self.columns]
            )
        return self._whole

    def parts(self) -> Iterator[Chat | Columns]:
        """The format's view of each ``CHUNK`` rows in turn (the columns must be there)."""
        if not len(self):
            return
        whole = self._arrays()
        for start in range(0, len(self), CHUNK):
            stop = min(start + CHUNK, len(self))
            arrays = [a.slice(start, stop - start) for a in whole]
            if self.is_chat:
                yield Chat(arrays[0])
            else:
                notna = self.frame[list(self.columns)].iloc[start:stop].notna().all(axis=1).to_numpy()
                yield Columns(self.columns, arrays, notna)

    def texts(self, pos: np.ndarray) -> list[str]:
        """The text rows ``pos`` (positions, usable rows) are tokenized as: the contents joined."""
        cells = [take_pylist(a, pos) for a in self._arrays()]
        if self.is_chat:
            return ["".join(m["content"] for m in msgs) for msgs in cells[0]]
        return cells[0] if len(cells) == 1 else ["".join(t) for t in zip(*cells, strict=True)]


def normalised_keys(df: pd.DataFrame, data_format: str) -> pd.Series:
    """Case- and whitespace-insensitive content per row: near-duplicates share it (leakage, split).

    Each text field is folded on its own, so padding inside a chat message or around a
    prompt does not hide a repeat.
    """
    parts = [p.normalised_keys() for p in Rows(df, data_format).parts()]
    return pd.Series(pd.arrays.ArrowStringArray(pa.chunked_array(parts, type=pa.large_string())), index=df.index)


class Columns:
    """Text or prompt/completion rows: the key is the columns joined with \\x1f."""

    turns = None  # no messages: the token check adds a fixed overhead per row

    def __init__(self, columns: tuple[str, ...], arrays: list, notna: np.ndarray) -> None:
        self.columns, self.arrays = columns, arrays
        self.n = len(notna)
        self.usable = notna  # a null cell has no key (null_text names it)

    def keys(self):
        return self._join(self.arrays)

    def normalised_keys(self):
        return self._join([fold_array(a) for a in self.arrays])

    @staticmethod
    def _join(arrays):
        return arrays[0] if len(arrays) == 1 else pc.binary_join_element_wise(*arrays, large("\x1f"))

    def nbytes(self) -> np.ndarray:
        return sum(pc.fill_null(pc.binary_length(a), 0).to_numpy(zero_copy_only=False) for a in self.arrays)

    def table(self, keys) -> pa.Table:
        """What preprocessing writes: the columns as they are."""
        return pa.table(dict(zip(self.columns, self.arrays, strict=True)))


class Chat:
    """Chat rows as Arrow arrays: the checks and keys in vectorised kernels, no dict per message.

    ``usable[i]`` is whether row i is a non-empty list of {role, content} strings
    (``contract.parse_messages`` would return it); the key is that list as
    ``json.dumps(..., ensure_ascii=False, sort_keys=True)`` writes it.
    """

    columns = ("messages",)

    def __init__(self, lists) -> None:
        if isinstance(lists, pa.ChunkedArray):  # one chunk is used as it is; several are combined (this slice only)
            lists = lists.chunk(0) if lists.num_chunks == 1 else lists.combine_chunks()
        self.n = len(lists)
        counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        elems = lists.flatten()  # the messages of non-null lists, in row order
        self.parent = np.repeat(np.arange(self.n), counts)
        self.turns = counts
        role, content = (as_large(elems.field(k)) for k in ("role", "content"))
        ok = pc.and_(pc.and_(elems.is_valid(), role.is_valid()), content.is_valid()).to_numpy(zero_copy_only=False)
        self.role, self.content = role, content
        self.usable = (counts > 0) & (np.bincount(self.parent[~ok], minlength=self.n) == 0)

    def _any(self, elem_mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.parent[elem_mask], minlength=self.n) > 0

    def bad(self) -> np.ndarray:
        """The messages rule: not a list of {role, content}, a role outside ROLES, blank
        content (Python's ``str.strip`` whitespace), or no assistant turn."""
        roles = pa.array(sorted(contract.ROLES), type=pa.large_string())
        role_ok = pc.fill_null(pc.is_in(self.role, value_set=roles), True)
        blank = pc.fill_null(pc.equal(pc.binary_length(pc.utf8_trim(self.content, characters=PY_SPACES)), 0), False)
        assistant = pc.fill_null(pc.equal(self.role, "assistant"), False)
        return (
            ~self.usable
            | self._any(~role_ok.to_numpy(zero_copy_only=False))
            | self._any(blank.to_numpy(zero_copy_only=False))
            | ~self._any(assistant.to_numpy(zero_copy_only=False))
        )

    def _per_row(self, elem_text, sep: str, invalid: str):
        """Join each row's message strings with ``sep``; rows that are not usable get ``invalid``."""
        offsets = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.turns, out=offsets[1:])
        rows = pa.LargeListArray.from_arrays(pa.array(offsets), elem_text)
        return pc.if_else(pa.array(self.usable), pc.binary_join(rows, large(sep)), large(invalid))

    def keys(self):
        elem = pc.binary_join_element_wise(
            large('{"content": "'),
            json_escape(self.content),
            large('", "role": "'),
            json_escape(self.role),
            large('"}'),
            large(""),
        )
        inner = self._per_row(elem, ", ", "")
        return pc.if_else(
            self.usable, pc.binary_join_element_wise(large("["), inner, large("]"), large("")), large("null")
        )

    def normalised_keys(self):
        return self._per_row(
            pc.binary_join_element_wise(self.role, fold_array(self.content), large("\x1f")), "\x1e", ""
        )

    def nbytes(self) -> np.ndarray:
        """UTF-8 bytes of each row's contents joined (the text the token check encodes)."""
        lengths = pc.fill_null(pc.binary_length(self.content), 0).to_numpy(zero_copy_only=False)
        return np.bincount(self.parent, weights=lengths, minlength=self.n).astype(np.int64)

    def table(self, keys) -> pa.Table:
        """What preprocessing writes: the messages as their key, canonical JSON text."""
        return pa.table({"messages": keys})


def _messages(col: pd.Series) -> pa.ChunkedArray:
    """A messages column as Arrow list<struct<role, content>>: the JSONL reader's column as it
    is, any other cells parsed once each (a cell that is not messages becomes null)."""
    if isinstance(col.dtype, pd.ArrowDtype) and is_messages_type(col.dtype.pyarrow_dtype):
        return col.array._pa_array
    typ = pa.list_(_MESSAGE)
    cells = col.tolist()
    return pa.chunked_array(
        [pa.array([_parsed(v) for v in cells[s : s + CHUNK]], type=typ) for s in range(0, len(cells), CHUNK)], type=typ
    )


def _parsed(value) -> list[dict[str, str]] | None:
    try:
        return contract.parse_messages(value)
    except contract.MessagesError:
        return None  # the messages rule names the row


def is_messages_type(typ) -> bool:
    """list<struct<role: string, content: string, ...>>: what a JSONL messages column parses to."""
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_struct(typ.value_type):
        return False
    fields = {f.name: f.type for f in typ.value_type}
    return all(
        pa.types.is_string(fields.get(k)) or pa.types.is_large_string(fields.get(k)) for k in ("role", "content")
    )


# --- The file -> DataFrame -------------------------------------------------------------------------------


def read_frame(path: Path) -> pd.DataFrame:
    """The file as a DataFrame indexed by each row's line number in the file (row number for Parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataCheckError(
                f"rule readable: {path.name} is not a readable Parquet file ({str(exc)[:160]}); re-export it"
            ) from None
        df.index = pd.RangeIndex(1, len(df) + 1)
        return df
    if suffix == ".csv":
        text = _decode(path.read_bytes(), path.name)
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except Exception as exc:
            raise DataCheckError(
                f"rule readable: {path.name} is not valid CSV ({str(exc)[:160]}); fix the quoting/columns"
            ) from None
        df.index = pd.RangeIndex(2, len(df) + 2)  # line 1 is the header
        return df
    lines, blank = _scan_jsonl(path)
    fast = None if blank or not lines else _read_jsonl_arrow(path, lines)
    return fast if fast is not None else _read_jsonl(_decode(path.read_bytes(), path.name), path.name)


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataCheckError(
            f"rule undecodable_bytes: {name} line {line} has bytes that are not UTF-8 (byte {exc.start}); "
            "re-encode the file as UTF-8"
        ) from None


_SCAN_BLOCK = 1 << 24
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # one regex pass: bytes.find for "\n\n" was slower


def _scan_jsonl(path: Path) -> tuple[int, bool]:
    """(lines, whether any line is blank), streaming the file in 16 MB blocks: the whole file
    is never held as bytes or str. Raises ``undecodable_bytes`` for a file that is not UTF-8.

    Lines are what the Arrow reader sees (split on \\n, a final \\n ends the last line);
    blank means empty or only spaces, tabs and CRs, which the line-by-line reader skips.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines, blank, tail, size = 0, False, b"", 0
    with path.open("rb") as f:
        while block := f.read(_SCAN_BLOCK):
            size += len(block)
            try:
                decoder.decode(block)
            except UnicodeDecodeError:
                _decode(path.read_bytes(), path.name)  # names the line
                raise
            newlines += block.count(b"\n")
            first = block.find(b"\n")
            if first < 0:
                tail += block
                continue
            if not blank:  # the line the block's first newline ends, then the lines between its newlines
                blank = not (tail + block[:first]).strip(b" \t\r") or _BLANK_LINE.search(block) is not None
            tail = block[block.rfind(b"\n") + 1 :]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        _decode(path.read_bytes(), path.name)
        raise
    if tail and not tail.strip(b" \t\r"):
        blank = True
    return (newlines + (1 if tail else 0)) if size else 0, blank


def _read_jsonl_arrow(path: Path, lines: int) -> pd.DataFrame | None:
    """pyarrow's JSON reader for the common case: no blank lines (so row i is line i), every
    line an object of consistently typed fields. None sends the file to the line-by-line
    reader, which names the bad line.

    Streamed in 4 MB blocks (peak: the table plus a few blocks; ``read_json`` on the whole
    file peaked at 2.4x the table). A list of {role, content} objects stays an Arrow
    list<struct> column (``pd.ArrowDtype``): no Python dict per message.
    """
    import pyarrow.json as pj

    table = None
    for block in (1 << 22, 1 << 26):  # a line longer than the block needs the bigger one
        try:
            reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=block))
            table = pa.Table.from_batches(list(reader), schema=reader.schema)
            break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    if table is None:
        try:  # infers the schema from the whole file, not the first block
            table = pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 26))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    if table.num_rows != lines:
        return None
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        cols[name] = (
            pd.Series(pd.arrays.ArrowExtensionArray(col), copy=False) if is_messages_type(col.type) else col.to_pandas()
        )
    del table
    df = pd.DataFrame(cols, copy=False)
    df.index = pd.RangeIndex(1, len(df) + 1)
    return df


def _read_jsonl(text: str, name: str) -> pd.DataFrame:
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = exc  # named below with the other kind of bad line
        if not isinstance(row, dict):
            what = (
                f"not valid JSON ({row.msg}); fix that line"
                if isinstance(row, json.JSONDecodeError)
                else f"a {type(row).__name__}, not an object; one JSON object per line"
            )
            raise DataCheckError(f"rule malformed_json: {name} line {i} is {what}") from None
        rows.append(row)
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    df = pd.DataFrame.from_records(rows)
    df.index = pd.Index(numbers, dtype="int64")
    return df
