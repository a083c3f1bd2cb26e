"""Corpus readers: a stream of ``(doc_id, text)`` records from a file, a directory or a list.

Formats (``format=None`` guesses from the path):

- ``text``: one document per line (UTF-8; a trailing ``\\r`` is dropped).
- ``jsonl``: one JSON object per line; the document is the string in ``field``.
- ``parquet``: the string column ``field``, read a record batch at a time.
- ``datasets``: a directory written by ``datasets.Dataset.save_to_disk`` (optional dependency
  ``datasets``); a ``DatasetDict`` needs ``split``.
- a Python list/tuple of strings (``score_corpus`` only).

``doc_id`` is the record's 0-based index in the source (line for text/JSONL, row otherwise),
so a result can always be traced back. Empty (or whitespace-only) documents are yielded as
``""``; the caller skips and counts them. Readers can start at any record (``start``), which
is what resuming uses. Errors name the file and the 1-based line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import InputError

FORMATS = ("text", "jsonl", "parquet", "datasets")
ENCODING_ERRORS = ("strict", "replace", "ignore", "skip")
_CHUNK = 1024


class Corpus:
    """A readable corpus. Iterate with :meth:`records`; ``len()`` is the number of records
    (cheap for every format: a line count for text/JSONL, metadata otherwise)."""

    format: str = ""

    def records(self, start: int = 0) -> Iterator[tuple[int, str]]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """What the corpus is, for ``meta.json``."""
        return {"format": self.format}


class ListCorpus(Corpus):
    """Documents given in memory."""

    format = "list"

    def __init__(self, docs):
        docs = list(docs)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise InputError(f"document {i} is a {type(d).__name__}, expected str")
        self.docs = docs

    def records(self, start: int = 0):
        for i in range(start, len(self.docs)):
            yield i, self.docs[i]

    def __len__(self) -> int:
        return len(self.docs)

    def describe(self) -> dict:
        return {"format": self.format, "records": len(self.docs)}


class _FileCorpus(Corpus):
    def __init__(self, path: Path):
        self.path = path
        self._len: int | None = None

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.path), "records": len(self)}


def _lines(path: Path, start: int):
    """(index, raw bytes without the newline) for every line from ``start`` on."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i < start:
                continue
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            yield i, raw


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (last != b"\n")


def _decode(path: Path, i: int, raw: bytes, errors: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "skip":
            return None
        if errors == "strict":
            raise InputError(
                f"{path}:{i + 1}: line is not valid UTF-8 ({e.reason} at byte {e.start}); "
                "decode it anyway with encoding_errors='replace' or 'ignore', or drop such lines "
                "with 'skip' (CLI: --encoding-errors)"
            ) from None
        return raw.decode("utf-8", errors=errors)


class TextCorpus(_FileCorpus):
    """One document per line."""

    format = "text"

    def __init__(self, path: Path, encoding_errors: str = "strict"):
        super().__init__(path)
        self.errors = encoding_errors

    def records(self, start: int = 0):
        for i, raw in _lines(self.path, start):
            text = _decode(self.path, i, raw, self.errors)
            yield i, ("" if text is None else text)

    def __len__(self) -> int:
        if self._len is None:
            self._len = _count_lines(self.path)
        return self._len

    def describe(self) -> dict:
        return {**super().describe(), "encoding_errors": self.errors}


class JsonlCorpus(_FileCorpus):
    """One JSON object per line; the document is ``obj[field]``."""

    format = "jsonl"

    def __init__(self, path: Path, field: str = "text", encoding_errors: str = "strict"):
        super().__init__(path)
        self.field = field
        self.errors = encoding_errors

    def records(self, start: int = 0):
        where = lambda i: f"{self.path}:{i + 1}"  # noqa: E731
        for i, raw in _lines(self.path, start):
            text = _decode(self.path, i, raw, self.errors)
            if text is None or not text.strip():
                yield i, ""
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{where(i)}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where(i)}: expected a JSON object, got {type(obj).__name__}")
            if self.field not in obj:
                keys = ", ".join(map(repr, list(obj)[:10])) or "none"
                raise InputError(
                    f"{where(i)}: no field {self.field!r} (fields: {keys}); choose the text field "
                    "with field= (CLI: --field)"
                )
            val = obj[self.field]
            if val is None:
                val = ""
            if not isinstance(val, str):
                raise InputError(f"{where(i)}: field {self.field!r} is a {type(val).__name__}, expected a string")
            yield i, val

    def __len__(self) -> int:
        if self._len is None:
            self._len = _count_lines(self.path)
        return self._len

    def describe(self) -> dict:
        return {**super().describe(), "field": self.field, "encoding_errors": self.errors}


def _check_string_column(where, field: str, names, types) -> None:
    if field not in names:
        raise InputError(f"{where}: no column {field!r} (columns: {', '.join(map(repr, names))}); "
                         "choose the text column with field= (CLI: --field)")
    t = types[list(names).index(field)]
    if "string" not in str(t).lower() and "utf8" not in str(t).lower():
        raise InputError(f"{where}: column {field!r} has type {t}, expected strings")


class ParquetCorpus(_FileCorpus):
    """The string column ``field`` of a Parquet file."""

    format = "parquet"

    def __init__(self, path: Path, field: str = "text"):
        super().__init__(path)
        import pyarrow.parquet as pq

        self.field = field
        try:
            self._pf = pq.ParquetFile(str(path))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise InputError(f"{path}: not a readable Parquet file ({e})") from e
        schema = self._pf.schema_arrow
        _check_string_column(path, field, schema.names, [f.type for f in schema])

    def __len__(self) -> int:
        return self._pf.metadata.num_rows

    def records(self, start: int = 0):
        md = self._pf.metadata
        row, groups = 0, []
        for g in range(md.num_row_groups):  # skip whole row groups before ``start``
            n = md.row_group(g).num_rows
            if row + n > start:
                groups.append(g)
            else:
                row += n
        if not groups:
            return
        for batch in self._pf.iter_batches(batch_size=_CHUNK, row_groups=groups, columns=[self.field]):
            for val in batch.column(0).to_pylist():
                if row >= start:
                    yield row, (val or "")
                row += 1

    def describe(self) -> dict:
        return {**super().describe(), "field": self.field}


class DatasetsCorpus(_FileCorpus):
    """A ``datasets`` directory (``load_from_disk``)."""

    format = "datasets"

    def __init__(self, path: Path, field: str = "text", split: str | None = None):
        super().__init__(path)
        try:
            import datasets
        except ImportError:
            raise InputError(
                f"{path}: reading a datasets directory needs the optional dependency 'datasets' "
                "(pip install 'gradsae[data]')"
            ) from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise InputError(f"{path}: holds splits {sorted(ds)}; choose one with split= (CLI: --split)")
                split = next(iter(ds))
            if split not in ds:
                raise InputError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        self.split = split
        self.field = field
        _check_string_column(path, field, ds.column_names, [ds.features[c] for c in ds.column_names])
        self._ds = ds.select_columns([field])

    def __len__(self) -> int:
        return len(self._ds)

    def records(self, start: int = 0):
        n = len(self._ds)
        for lo in range(start, n, _CHUNK):
            vals = self._ds[lo : min(n, lo + _CHUNK)][self.field]
            for i, v in enumerate(vals):
                yield lo + i, (v or "")

    def describe(self) -> dict:
        return {**super().describe(), "field": self.field, "split": self.split}


def guess_format(path: Path) -> str:
    """The format a path most likely holds."""
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def open_corpus(data, *, format: str | None = None, field: str = "text", split: str | None = None,
                encoding_errors: str = "strict") -> Corpus:
    """Open ``data`` (a path, a :class:`Corpus`, or a list of strings) as a :class:`Corpus`.

    Args:
        data: file or directory path, an existing :class:`Corpus`, or a list/tuple of str.
        format: one of ``text``, ``jsonl``, ``parquet``, ``datasets``; ``None`` guesses from
            the path (directory: datasets; ``.jsonl``/``.json``: jsonl; ``.parquet``: parquet;
            anything else: text).
        field: the text field (JSONL) or column (Parquet, datasets).
        split: the split of a ``DatasetDict`` directory.
        encoding_errors: what to do with lines that are not UTF-8 (text/JSONL): ``strict``
            (error naming the file and line), ``replace``, ``ignore`` (as ``bytes.decode``) or
            ``skip`` (treat the line as an empty document).
    """
    if isinstance(data, Corpus):
        return data
    if isinstance(data, (list, tuple)):
        return ListCorpus(data)
    if not isinstance(data, (str, os.PathLike)):
        raise InputError(f"data must be a path, a list of strings or a Corpus, got {type(data).__name__}")
    if encoding_errors not in ENCODING_ERRORS:
        raise InputError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
    path = Path(data)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = format or guess_format(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    if fmt == "datasets":
        if not path.is_dir():
            raise InputError(f"{path}: format 'datasets' needs a directory written by save_to_disk")
        return DatasetsCorpus(path, field, split)
    if path.is_dir():
        raise InputError(f"{path} is a directory; format {fmt!r} needs a file")
    if fmt == "text":
        return TextCorpus(path, encoding_errors)
    if fmt == "jsonl":
        return JsonlCorpus(path, field, encoding_errors)
    return ParquetCorpus(path, field)
