"""Reading a dataset file and naming its rows: shared by the data checks and preprocessing.

Reads CSV, JSONL and Parquet into a DataFrame with one ``key`` per row (the content that
makes two rows the same example) and the row's line number in the file, so every error
can point at a line a person can open.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from loraflow.errors import DataCheckError

FORMAT_COLUMNS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = frozenset({"system", "user", "assistant", "tool"})
CHUNK = 50_000  # rows per slice where a slice's intermediates are built and dropped in turn
PY_CHUNK = 20_000  # rows per batch of Python strings (hashing)


def read(path: Path) -> pd.DataFrame:
    """The file as a DataFrame indexed by each row's line number in the file (row number for Parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataCheckError(f"rule readable: {path.name} is not a readable Parquet file ({str(exc)[:160]}); re-export it") from None
        df.index = pd.RangeIndex(1, len(df) + 1)
        return df
    if suffix == ".csv":
        text = _decode(path.read_bytes(), path.name)
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except Exception as exc:
            raise DataCheckError(f"rule readable: {path.name} is not valid CSV ({str(exc)[:160]}); fix the quoting/columns") from None
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
_SPACES_ONLY_LINE = re.compile(rb"\n[ \t\r]+\n")


def _scan_jsonl(path: Path) -> tuple[int, bool]:
    """(lines, whether any line is blank), streaming the file in 16 MB blocks: the whole file
    is never held as bytes or str. Raises ``undecodable_bytes`` for a file that is not UTF-8.

    Lines are what the Arrow reader sees (split on \\n, a final \\n ends the last line);
    blank means empty or only spaces, tabs and CRs, which the line-by-line reader skips.
    """
    import codecs

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
                blank = (not (tail + block[:first]).strip(b" \t\r") or b"\n\n" in block
                         or _SPACES_ONLY_LINE.search(block) is not None)
            tail = block[block.rfind(b"\n") + 1:]
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
    import pyarrow as pa
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
        cols[name] = (pd.Series(pd.arrays.ArrowExtensionArray(col), copy=False) if is_messages_type(col.type)
                      else col.to_pandas())
    del table
    df = pd.DataFrame(cols, copy=False)
    df.index = pd.RangeIndex(1, len(df) + 1)
    return df


def is_messages_type(typ) -> bool:
    """list<struct<role: string, content: string, ...>>: what a JSONL messages column parses to."""
    import pyarrow as pa

    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_struct(typ.value_type):
        return False
    fields = {f.name: f.type for f in typ.value_type}
    return all(pa.types.is_string(fields.get(k)) or pa.types.is_large_string(fields.get(k)) for k in ("role", "content"))


def _read_jsonl(text: str, name: str) -> pd.DataFrame:
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataCheckError(f"rule malformed_json: {name} line {i} is not valid JSON ({exc.msg}); fix that line") from None
        if not isinstance(row, dict):
            raise DataCheckError(f"rule malformed_json: {name} line {i} is a {type(row).__name__}, not an object; one JSON object per line")
        rows.append(row)
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    df = pd.DataFrame.from_records(rows)
    df.index = pd.Index(numbers, dtype="int64")
    return df


def canonical_messages(value) -> list[dict[str, str]] | None:
    """A messages cell as a list of {role, content}, or None when it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def keys(df: pd.DataFrame, data_format: str) -> pd.Series:
    """The content of each row as one string (what duplicates and the split look at)."""
    if data_format == "text":
        return df["text"].astype(str)
    if data_format == "prompt_completion":
        return df["prompt"].astype(str) + "\x1f" + df["completion"].astype(str)
    return pd.Series(Chat(df["messages"]).keys().to_pylist(), index=df.index, dtype=object)


def parse_messages(df: pd.DataFrame) -> list[list[dict[str, str]] | None]:
    """``canonical_messages`` of every row (Python objects: for small frames and tests)."""
    return [canonical_messages(v) for v in df["messages"].tolist()]


def chat_keys(parsed: list) -> list[str]:
    return [json.dumps(m, ensure_ascii=False, sort_keys=True) for m in parsed]


def chat_normalised_keys(parsed: list) -> list[str]:
    # Role and folded content, joined with separators JSON text cannot contain unescaped.
    return ["\x1e".join(m["role"] + "\x1f" + _fold(m["content"]) for m in (msgs or [])) for msgs in parsed]


def _fold(text: str) -> str:
    """Lower case, whitespace runs (Unicode whitespace, as str.split sees it) as one space, trimmed."""
    return " ".join(text.lower().split())


def normalised_keys(df: pd.DataFrame, data_format: str) -> pd.Series:
    """Case- and whitespace-insensitive content per row: near-duplicates share it (leakage, split).

    Each text field is folded on its own, so padding inside a chat message or around a
    prompt does not hide a repeat.
    """
    return pd.Series(pd.arrays.ArrowStringArray(normalised_key_array(df, data_format)), index=df.index)


def key_array(df: pd.DataFrame, data_format: str, rows: slice = slice(None)):
    """``keys`` of ``rows`` as an Arrow large_string array (no Python strings)."""
    import pyarrow.compute as pc

    if data_format == "chat":
        return Chat(df["messages"].iloc[rows]).keys()
    cols = [text_array(df[c].iloc[rows]) for c in FORMAT_COLUMNS[data_format]]
    return cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, _s("\x1f"))


def normalised_key_array(df: pd.DataFrame, data_format: str, rows: slice = slice(None)):
    """``normalised_keys`` of ``rows`` as an Arrow large_string array."""
    import pyarrow.compute as pc

    if data_format == "chat":
        return Chat(df["messages"].iloc[rows]).normalised_keys()
    cols = [fold_array(text_array(df[c].iloc[rows])) for c in FORMAT_COLUMNS[data_format]]
    return cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, _s("\x1f"))


def text_array(col: pd.Series):
    """A text column as an Arrow large_string (chunked) array, zero-copy when it is Arrow-backed
    already (chunks are never combined: that would copy the column)."""
    import pyarrow as pa

    arr = col.array
    if isinstance(arr, pd.arrays.ArrowStringArray) or (isinstance(col.dtype, pd.ArrowDtype) and pa.types.is_string(col.dtype.pyarrow_dtype)):
        out = arr._pa_array  # the ChunkedArray the column holds
        return out.cast(pa.large_string()) if out.type != pa.large_string() else out
    return pa.array(col.astype(str), type=pa.large_string())


def take_pylist(arr, pos: np.ndarray) -> list:
    """``arr.take(pos).to_pylist()`` chunk by chunk: Arrow's take on a ChunkedArray of strings or
    lists concatenates every chunk first, a copy of the whole column for a few rows."""
    import pyarrow as pa

    pos = np.asarray(pos, dtype=np.int64)
    if not isinstance(arr, pa.ChunkedArray):
        return arr.take(pa.array(pos)).to_pylist()
    starts = np.cumsum([0] + [len(c) for c in arr.chunks])
    which = np.searchsorted(starts, pos, side="right") - 1
    order = np.argsort(which, kind="stable")
    out: list = [None] * len(pos)
    bounds = np.searchsorted(which[order], np.arange(arr.num_chunks + 1))
    for k in range(arr.num_chunks):
        sel = order[bounds[k]:bounds[k + 1]]
        if len(sel):
            for i, v in zip(sel.tolist(), arr.chunk(k).take(pa.array(pos[sel] - starts[k])).to_pylist()):
                out[i] = v
    return out


# Code points whose lower case Arrow (utf8proc) and Python disagree on ('İ'.lower() is two
# code points in Python, one in Arrow; newer Unicode letters; 'Σ', which Python lowers by
# context): rows with one are folded in Python. Computed once, when a text is not ASCII.
_LOWER_DIFFERS = None


def _lower_differs_pattern() -> str:
    global _LOWER_DIFFERS
    if _LOWER_DIFFERS is None:
        import pyarrow as pa
        import pyarrow.compute as pc

        cps = [c for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000]
        lowered = pc.utf8_lower(pa.array([chr(c) for c in cps])).to_pylist()
        bad = [c for c, low in zip(cps, lowered) if low != chr(c).lower()]
        bad.append(0x3A3)  # capital sigma: Python lowers it to final sigma at the end of a word, by context
        _LOWER_DIFFERS = "[" + "".join(f"\\x{{{c:x}}}" for c in bad) + "]" if bad else ""
    return _LOWER_DIFFERS


# Python's whitespace (str.split) other than the space, or two spaces in a row: a trimmed,
# lower-cased text without any of these is already folded.
_MESSY_SPACE = (r"[\t\n\x0b\x0c\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
                r"\x{205f}\x{3000}]|  ")


def fold_array(arr):
    """``_fold`` of every string, in Arrow: a 1M-row column in about a second instead of ten.

    Arrow's Unicode whitespace is Python's (``str.split``) code point for code point; only
    the rows with whitespace other than single spaces are split and re-joined. Arrow's
    lower case differs from Python's for a few dozen code points, and rows holding one
    go through ``_fold``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        return pa.chunked_array([fold_array(c) for c in arr.chunks], type=pa.large_string())
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    ascii_only = pc.all(pc.string_is_ascii(arr)).as_py() is not False
    out = pc.utf8_trim_whitespace(pc.ascii_lower(arr) if ascii_only else pc.utf8_lower(arr))
    messy = pc.fill_null(pc.match_substring_regex(out, _MESSY_SPACE), False)
    if pc.any(messy).as_py():
        words = pc.utf8_split_whitespace(out.filter(messy))
        out = pc.replace_with_mask(out, messy, pc.binary_join(words, _s(" ")).cast(pa.large_string()))
    if not ascii_only and (pattern := _lower_differs_pattern()):
        odd = pc.fill_null(pc.match_substring_regex(arr, pattern), False)
        if pc.any(odd).as_py():
            fixed = [None if t is None else _fold(t) for t in arr.filter(odd).to_pylist()]
            out = pc.replace_with_mask(out, odd, pa.array(fixed, type=pa.large_string()))
    return out


def digests(keys) -> np.ndarray:
    """sha256 of each key's UTF-8 bytes as an (n, 32) uint8 array, in chunks of Python strings."""
    sha = hashlib.sha256
    out = np.empty((len(keys), 32), dtype=np.uint8)
    for start in range(0, len(keys), PY_CHUNK):
        part = keys.slice(start, PY_CHUNK).to_pylist()
        out[start:start + len(part)] = np.frombuffer(b"".join([sha(k.encode()).digest() for k in part]), dtype=np.uint8).reshape(-1, 32)
    return out


def duplicated(digest: np.ndarray) -> np.ndarray:
    """Rows whose key (by its sha256) appeared in an earlier row: ``Series.duplicated(keep="first")``
    without a hash table of the strings themselves."""
    halves = digest[:, :16].copy().view(np.uint64)  # 128 bits: a collision is not a practical concern
    return pd.DataFrame(halves).duplicated(keep="first").to_numpy()


def _json_escape(arr):
    """Each string as ``json.dumps(s, ensure_ascii=False)`` writes it between its quotes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        return pa.chunked_array([_json_escape(c) for c in arr.chunks], type=arr.type)
    needs = pc.fill_null(pc.match_substring_regex(arr, r'[\x00-\x1f"\\]'), False)
    if not pc.any(needs).as_py():
        return arr
    from json.encoder import encode_basestring

    fixed = [encode_basestring(t)[1:-1] for t in arr.filter(needs).to_pylist()]
    return pc.replace_with_mask(arr, needs, pa.array(fixed, type=arr.type))


class Chat:
    """A messages column as Arrow arrays: the checks and keys in vectorised kernels, no dict
    per message. An Arrow list<struct<role, content>> column (what the JSONL reader gives) is
    used as it is; anything else goes through ``canonical_messages`` once.

    ``valid[i]`` is whether ``canonical_messages`` of row i is a list (not None).
    """

    def __init__(self, col: pd.Series) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(col.dtype, pd.ArrowDtype) and is_messages_type(col.dtype.pyarrow_dtype):
            lists = col.array._pa_array
            lists = lists.combine_chunks() if lists.num_chunks != 1 else lists.chunk(0)
        else:
            typ = pa.list_(pa.struct([("role", pa.large_string()), ("content", pa.large_string())]))
            lists = pa.array([canonical_messages(v) for v in col.tolist()], type=typ)
        self.n = len(lists)
        self.lists = lists
        counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        elems = lists.flatten()  # the messages of non-null lists, in row order
        self.parent = np.repeat(np.arange(self.n), counts)
        self.counts = counts
        role, content = (elems.field(k) for k in ("role", "content"))
        role = role.cast(pa.large_string()) if role.type != pa.large_string() else role
        content = content.cast(pa.large_string()) if content.type != pa.large_string() else content
        ok = pc.and_(pc.and_(elems.is_valid(), role.is_valid()), content.is_valid()).to_numpy(zero_copy_only=False)
        self.role, self.content = role, content
        self.valid = (counts > 0) & (np.bincount(self.parent[~ok], minlength=self.n) == 0)

    def _any(self, elem_mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.parent[elem_mask], minlength=self.n) > 0

    def bad(self) -> np.ndarray:
        """The messages rule: not a list of {role, content}, a role outside ROLES, blank
        content (Python's ``str.strip`` whitespace), or no assistant turn."""
        import pyarrow as pa
        import pyarrow.compute as pc

        role_ok = pc.fill_null(pc.is_in(self.role, value_set=pa.array(sorted(ROLES), type=pa.large_string())), True)
        blank = pc.fill_null(pc.equal(pc.binary_length(pc.utf8_trim(self.content, characters=_PY_SPACES)), 0), False)
        assistant = pc.fill_null(pc.equal(self.role, "assistant"), False)
        return (~self.valid | self._any(~role_ok.to_numpy(zero_copy_only=False)) | self._any(blank.to_numpy(zero_copy_only=False))
                | ~self._any(assistant.to_numpy(zero_copy_only=False)))

    def _per_row(self, elem_text, sep: str, invalid: str):
        """Join each row's message strings with ``sep``; rows that are not valid get ``invalid``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        offsets = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.counts, out=offsets[1:])
        rows = pa.LargeListArray.from_arrays(pa.array(offsets), elem_text)
        return pc.if_else(pa.array(self.valid), pc.binary_join(rows, _s(sep)), _s(invalid))

    def keys(self):
        """``json.dumps(canonical_messages(v), ensure_ascii=False, sort_keys=True)`` per row, in Arrow."""
        import pyarrow.compute as pc

        elem = pc.binary_join_element_wise(_s('{"content": "'), _json_escape(self.content), _s('", "role": "'),
                                           _json_escape(self.role), _s('"}'), _s(""))
        inner = self._per_row(elem, ", ", "")
        return pc.if_else(self.valid, pc.binary_join_element_wise(_s("["), inner, _s("]"), _s("")), _s("null"))

    def normalised_keys(self):
        import pyarrow.compute as pc

        return self._per_row(pc.binary_join_element_wise(self.role, fold_array(self.content), _s("\x1f")), "\x1e", "")

    def nbytes(self) -> np.ndarray:
        """UTF-8 bytes of each row's contents joined (the text the token check encodes)."""
        import pyarrow.compute as pc

        lengths = pc.fill_null(pc.binary_length(self.content), 0).to_numpy(zero_copy_only=False)
        return np.bincount(self.parent, weights=lengths, minlength=self.n).astype(np.int64)

    def texts(self, idx: np.ndarray) -> list[str]:
        import pyarrow as pa

        return [("".join(m["content"] for m in msgs) if msgs else "") for msgs in self.lists.take(pa.array(idx)).to_pylist()]


def _s(text: str):
    import pyarrow as pa

    return pa.scalar(text, type=pa.large_string())


# What str.strip() removes: "".join(c for c in map(chr, range(0x110000)) if c.isspace())
_PY_SPACES = "\x09\x0a\x0b\x0c\x0d\x1c\x1d\x1e\x1f\x20\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def split_bucket(norm_keys) -> pd.Series | np.ndarray:
    """A stable number in [0, 1) per row from its normalised content (not its position).

    Takes a Series (returns one on its index) or an Arrow string array (returns an array).
    """
    blake = hashlib.blake2b
    arr = norm_keys if not isinstance(norm_keys, pd.Series) else None
    out = np.empty(len(norm_keys), dtype=np.float64)
    for start in range(0, len(norm_keys), PY_CHUNK):  # Python strings for one batch at a time
        keys = (norm_keys.iloc[start:start + PY_CHUNK].tolist() if arr is None else arr.slice(start, PY_CHUNK).to_pylist())
        big_endian = np.frombuffer(b"".join([blake(k.encode(), digest_size=8).digest() for k in keys]), dtype=">u8")
        # uint64 -> float64 rounds to nearest, and dividing by 2**64 is exact: int.from_bytes(...) / 2**64, bit for bit
        out[start:start + len(keys)] = big_endian.astype(np.float64) / 2.0**64
    return out if arr is not None else pd.Series(out, index=norm_keys.index)
