"""Tables of paths as inputs (``--from-table FILE --column NAME``): parquet, CSV or JSON lines.

Rows are read in batches and handed on one path at a time, so a table of 10^7 rows is never in
memory at once: parquet through ``pyarrow.parquet.ParquetFile.iter_batches`` (pyarrow is the
optional extra ``vitembed[parquet]``), CSV through the ``csv`` module, JSON lines one line at a
time. The paths go where paths from stdin go (``inputs.plan_jobs``): a relative one is relative
to the current directory, or keyed relative to ``--relative-to``. Does not import torch.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator

from .errors import UsageError, shown

TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BATCH_ROWS = 65536


def table_format(path: str) -> str:
    """``parquet``, ``csv`` or ``jsonl`` from the file's suffix (``TABLE_FORMATS``).

    Raises:
        UsageError: another suffix.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TABLE_FORMATS:
        raise UsageError(f"--from-table {shown(path)}: unknown table format {suffix or '(no suffix)'!r}; "
                         f"expected one of {', '.join(TABLE_FORMATS)}")
    return TABLE_FORMATS[suffix]


def read_table_paths(path: str, column: str = "path") -> Iterator[str]:
    """The values of ``column`` in the table ``path``, in row order; empty and null cells skipped.

    The format comes from the suffix (``table_format``). The file is checked (it opens, the column
    exists) before the first value is yielded.

    Raises:
        UsageError: the file cannot be read, its format is unknown, the column is missing (the
            message lists the columns there are), a row is not valid JSON or a value is not text,
            or pyarrow is missing for parquet; each names the file (and the row).
    """
    fmt = table_format(path)
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise UsageError(f"--from-table {shown(path)}: {e.strerror or e}") from None
    handle.close()
    reader = {"parquet": _parquet, "csv": _csv, "jsonl": _jsonl}[fmt](path, column)
    first = next(reader, None)  # the checks, before the caller starts
    return _chain(first, reader)


def _chain(first: str | None, rest: Iterator[str]) -> Iterator[str]:
    if first is not None:
        yield first
        yield from rest


def _missing(path: str, column: str, columns) -> UsageError:
    return UsageError(f"--from-table {shown(path)}: no column {column!r} (columns: {', '.join(map(str, columns)) or 'none'}); "
                      "name one with --column")


def _text(path: str, row: int, value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UsageError(f"--from-table {shown(path)}: row {row}: expected a path (text), got {type(value).__name__} "
                         f"{repr(value)[:80]}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which no file name holds
        raise UsageError(f"--from-table {shown(path)}: row {row}: {ascii(value)[:80]} is not a valid path "
                         "(a lone UTF-16 surrogate)") from None
    return value


def _parquet(path: str, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("--from-table: parquet tables need pyarrow (pip install 'vitembed[parquet]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise UsageError(f"--from-table {shown(path)}: not a readable parquet file ({e})") from None
    if column not in table.schema_arrow.names:
        raise _missing(path, column, table.schema_arrow.names)
    row = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if (text := _text(path, row, value)) is not None:
                yield text


def _csv(path: str, column: str) -> Iterator[str]:
    # utf-8-sig: a byte-order mark (as Excel writes) is not part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        row = 0
        try:
            header = next(reader, None)
            if header is None or column not in header:
                raise _missing(path, column, header or [])
            at = header.index(column)
            for row, values in enumerate(reader, start=1):
                if at < len(values) and values[at]:
                    yield values[at]
        except csv.Error as e:  # a cell over csv's field limit, a NUL byte
            raise UsageError(f"--from-table {shown(path)}: row {row + 1}: not readable as CSV ({e})") from None


def _jsonl(path: str, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--from-table {shown(path)}: line {row}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UsageError(f"--from-table {shown(path)}: line {row}: JSON nested too deeply") from None
            except ValueError as e:  # a number of over 4300 digits
                raise UsageError(f"--from-table {shown(path)}: line {row}: not readable as JSON ({e})") from None
            if not isinstance(record, dict) or column not in record:
                what = f"columns: {', '.join(record) or 'none'}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise UsageError(f"--from-table {shown(path)}: line {row}: no column {column!r} ({what}); name one with --column")
            if (text := _text(path, row, record[column])) is not None:
                yield text
