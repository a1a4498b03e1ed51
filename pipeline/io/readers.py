"""Read one shard as Arrow tables of (id, text, shard, row, error...), streaming and bounded in memory.

A row that cannot become a document is kept, with a reason code, a message and an excerpt of the
raw input, so it ends in the errors dataset instead of vanishing (or, in strict mode, stops the
job with its file and row). A file that cannot be read on (corrupt gzip, unreadable Parquet,
permission denied, vanished) is reported once through on_file_error after the rows read before it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.errors import BadInputError
from pipeline.faults import failpoint
from pipeline.io.ranges import Range, contains
from pipeline.io.shards import Shard
from pipeline.io.storage import filesystem_for

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("error", pa.string()),  # reason code; null for a good row
        ("error_message", pa.string()),
        ("excerpt", pa.string()),
    ]
)
EXCERPT_CHARS = 200
# Bytes looked at to tell a binary file from text.
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class RowProblem:
    """Why a row is not a document: a reason code (see README), what was wrong, and the raw input."""

    reason: str
    message: str
    excerpt: str


@dataclass(frozen=True)
class FileProblem:
    """Why a file could not be read (on): a reason code and what was wrong."""

    reason: str
    message: str


class _FileFailedError(Exception):
    def __init__(self, problem: FileProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def read_shard(
    shard: Shard,
    text_field: str,
    id_field: str | None,
    storage: StorageConfig,
    *,
    skip: list[Range] = (),
    rejected: dict[int, str] | None = None,
    rows_per_table: int = 8192,
    strict: bool = False,
    on_end: Callable[[int], None] | None = None,
    on_file_error: Callable[[int, FileProblem], None] | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of at most rows_per_table rows, rows numbered from 0 in shard order.

    Rows in skip (sorted, merged ranges: already committed) are counted but not emitted; rows in
    rejected (row -> why: a repeated id) become dead letters with reason duplicate_id. At the
    end of the shard on_end gets its row count; if the file fails part way, on_file_error gets the
    rows read before the failure and the problem instead. strict raises BadInputError at the first
    bad row or file.
    """
    records = _records(shard, text_field, id_field, storage)
    columns: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    rows_read = 0
    try:
        for row, (doc_id, text, problem) in enumerate(records):
            rows_read = row + 1
            if problem is None and rejected and row in rejected:
                problem, text = _problem("duplicate_id", rejected[row], text), None
            if problem is not None and strict:
                raise BadInputError(f"{shard.url} row {row}: {problem.message}")
            if skip and contains(skip, row):
                continue
            if doc_id is None and id_field is None:  # the row's id is derived from where it is
                doc_id = f"{shard.relative_path}#{row}"
            columns["id"].append(doc_id)
            columns["text"].append(text)
            columns["row"].append(row)
            columns["error"].append(problem and problem.reason)
            columns["error_message"].append(problem and problem.message)
            columns["excerpt"].append(problem and problem.excerpt)
            if len(columns["row"]) == rows_per_table:
                yield _table(columns, shard)
                failpoint("read")
                columns = {name: [] for name in ROW_SCHEMA.names}
    except _FileFailedError as failed:
        if strict or on_file_error is None:
            raise BadInputError(f"{shard.url} after row {rows_read}: {failed.problem.message}") from failed
        if columns["row"]:
            yield _table(columns, shard)
        on_file_error(rows_read, failed.problem)
        return
    if columns["row"]:
        yield _table(columns, shard)
        failpoint("read")
    if on_end is not None:
        on_end(rows_read)


def _table(columns: dict[str, list], shard: Shard) -> pa.Table:
    columns["shard"] = [shard.url] * len(columns["row"])
    return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)


def _records(shard: Shard, text_field: str, id_field: str | None, storage: StorageConfig):
    """(id or None, text or None, RowProblem or None) per row; _FileFailedError when the file cannot go on."""
    try:
        shard.url.encode("utf-8")
    except UnicodeEncodeError as err:  # ids, records and Arrow columns all need the name as text
        name = shard.url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise _FileFailedError(
            FileProblem("invalid_file_name", f"the file name {name} is not valid UTF-8 ({err.reason}); rename it")
        ) from err
    fs, path = filesystem_for(shard.url, storage)
    try:
        if shard.format == "parquet":
            yield from _parquet_records(fs, path, shard, text_field, id_field)
        elif shard.format in ("jsonl", "text"):
            yield from _line_records(fs, path, shard, text_field, id_field)
        else:
            raise ValueError(f"unknown format {shard.format!r} for {shard.url}")
    except PermissionError as err:
        raise _FileFailedError(
            FileProblem("permission_denied", f"access denied ({err}); check the credentials")
        ) from err
    except FileNotFoundError as err:
        raise _FileFailedError(FileProblem("file_vanished", "the file disappeared after it was listed")) from err
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise _FileFailedError(
            FileProblem("corrupt_compression", f"compressed data is corrupt or cut short ({err})")
        ) from err
    except pa.ArrowInvalid as err:
        raise _FileFailedError(FileProblem("unreadable_parquet", f"not a readable Parquet file ({err})")) from err
    except Exception as err:
        # pyarrow reports corrupt pages as a plain OSError; its subclasses (connection errors) must
        # still end the job, so that a re-run resumes once storage answers.
        if type(err) is OSError and shard.format == "parquet":
            raise _FileFailedError(FileProblem("unreadable_parquet", f"corrupt Parquet data ({err})")) from err
        if type(err).__name__ == "ZstdError":  # importable only where zstandard is installed
            raise _FileFailedError(FileProblem("corrupt_compression", f"zstd data is corrupt ({err})")) from err
        raise


def _line_records(fs, path, shard: Shard, text_field: str, id_field: str | None):
    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(SNIFF_BYTES)
        if b"\x00" in head:
            raise _FileFailedError(FileProblem("binary_file", "binary data (NUL bytes) where text was expected"))
        for raw in _lines(f, head):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield None, None, _problem("invalid_utf8", f"invalid UTF-8 at byte {err.start}", raw)
                continue
            if shard.format == "text":
                yield (None, *_checked_text(line, lambda line=line: line))
            elif not line.strip():
                yield None, None, _problem("empty_line", "an empty line where a JSON object was expected", line)
            else:
                yield _json_record(line, text_field, id_field)


def _lines(f, head: bytes, chunk_bytes: int = 1 << 20):
    """Lines as bytes without their line ending, read in large chunks."""
    pending = head
    while True:
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.removesuffix(b"\r")
        chunk = f.read(chunk_bytes)
        if not chunk:
            break
        pending += chunk
    if pending:
        yield pending.removesuffix(b"\r")


def _json_record(line: str, text_field: str, id_field: str | None):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, None, _problem("malformed_json", f"not valid JSON ({err.msg}, column {err.colno})", line)
    if not isinstance(record, dict):
        return None, None, _problem("not_an_object", f"a JSON {type(record).__name__}, not an object", line)
    doc_id = None
    if id_field is not None:
        if record.get(id_field) is None:
            message = f"no id in field {id_field!r}; is --id-field correct? Fields: {sorted(record)}"
            return None, None, _problem("missing_id", message, line)
        doc_id, problem = _checked_id(record[id_field], id_field, lambda: line)
        if problem is not None:
            return None, None, problem
    if text_field not in record:
        message = f"no field {text_field!r}; is --text-field correct? Fields: {sorted(record)}"
        return doc_id, None, _problem("missing_text", message, line)
    return (doc_id, *_checked_text(record[text_field], lambda: line, text_field))


def _checked_text(value, raw: Callable[[], str], field: str = "text") -> tuple[str | None, RowProblem | None]:
    """(text, None) for a good text; else (None, the problem, with raw() as its excerpt)."""
    if isinstance(value, str) and value.strip() and "\x00" not in value:
        return value, None  # the good path: nothing else is computed
    if value is None:
        return None, _problem("null_text", f"field {field!r} is null", raw())
    if not isinstance(value, str):
        return None, _problem("non_string_text", f"field {field!r} is a {type(value).__name__}, not a string", raw())
    if "\x00" in value:
        return None, _problem("nul_bytes", "the text holds NUL bytes (binary data?); remove them upstream", raw())
    return None, _problem("empty_text", "the text is empty or only whitespace", raw())


def _checked_id(value, field: str, raw: Callable[[], str]) -> tuple[str | None, RowProblem | None]:
    """An id is a string or an integer, stored as text: 1 and "1" are the same id. Anything else is refused
    rather than stored as its Python form."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    kind = type(value).__name__
    return None, _problem(
        "invalid_id", f"the id in {field!r} is a {kind} ({value!r:.40}); ids are strings or integers", raw()
    )


def _problem(reason: str, message: str, raw: str | bytes) -> RowProblem:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="backslashreplace")
    excerpt = raw[:EXCERPT_CHARS].replace("\x00", "\\x00")
    return RowProblem(reason, message, excerpt + ("..." if len(raw) > EXCERPT_CHARS else ""))


def _parquet_records(fs, path, shard: Shard, text_field: str, id_field: str | None, rows_per_batch: int = 8192):
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        for field in filter(None, (text_field, id_field)):
            if field not in schema.names:
                raise _FileFailedError(
                    FileProblem(
                        "missing_column",
                        f"no column {field!r}; is --text-field/--id-field correct? Columns: {schema.names}",
                    )
                )
        columns = [text_field] if id_field is None else [text_field, id_field]
        for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=columns):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for text, doc_id in zip(texts, ids, strict=True):

                def raw(text=text, doc_id=doc_id) -> str:  # the row as JSON, only for a row that is a problem
                    return json.dumps({text_field: text, **({id_field: doc_id} if id_field else {})}, default=str)

                if id_field is not None:
                    if doc_id is None:
                        yield None, None, _problem("missing_id", f"null id in column {id_field!r}", raw())
                        continue
                    doc_id, problem = _checked_id(doc_id, id_field, raw)
                    if problem is not None:
                        yield None, None, problem
                        continue
                yield (doc_id, *_checked_text(text, raw, text_field))
