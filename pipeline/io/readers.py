"""Read one shard as Arrow tables of (id, text, shard, row), streaming and bounded in memory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
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
    ]
)


class BadInputError(ValueError):
    """A shard or row that cannot be read; the message names the file and row."""


def read_shard(
    shard: Shard,
    text_field: str,
    id_field: str | None,
    storage: StorageConfig,
    *,
    skip: list[Range] = (),
    rows_per_table: int = 8192,
    on_end: Callable[[int], None] | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of at most rows_per_table rows, rows numbered from 0 in shard order.

    Rows in skip (sorted, merged ranges: already committed) are counted but not emitted; on_end
    gets the shard's row count once the whole shard has been read.
    """
    fs, path = filesystem_for(shard.url, storage)
    if shard.format == "parquet":
        records = _parquet_records(fs, path, shard, text_field, id_field, rows_per_table)
    elif shard.format == "jsonl":
        records = _jsonl_records(fs, path, shard, text_field, id_field)
    elif shard.format == "text":
        records = _text_records(fs, path)
    else:
        raise ValueError(f"unknown format {shard.format!r} for {shard.url}")
    ids, texts, rows = [], [], []
    row = -1
    for row, (doc_id, text) in enumerate(records):
        if skip and contains(skip, row):
            continue
        ids.append(doc_id if doc_id is not None else f"{shard.relative_path}#{row}")
        texts.append(text)
        rows.append(row)
        if len(rows) == rows_per_table:
            yield _table(ids, texts, shard, rows)
            failpoint("read")
            ids, texts, rows = [], [], []
    if rows:
        yield _table(ids, texts, shard, rows)
        failpoint("read")
    if on_end is not None:
        on_end(row + 1)


def _table(ids: list[str], texts: list[str], shard: Shard, rows: list[int]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.string()), pa.array([shard.url] * len(rows)), pa.array(rows)],
        schema=ROW_SCHEMA,
    )


def _checked_text(value, shard: Shard, row: int, text_field: str, keys) -> str:
    if value is None:
        raise BadInputError(
            f"{shard.url} row {row}: no text in field {text_field!r}. Is --text-field correct? "
            f"Available fields: {sorted(keys)}"
        )
    if not isinstance(value, str):
        raise BadInputError(f"{shard.url} row {row}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def _jsonl_records(fs, path, shard: Shard, text_field: str, id_field: str | None):
    with fs.open(path, "rt", compression="infer", encoding="utf-8") as lines:
        for row, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{shard.url} row {row}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise BadInputError(f"{shard.url} row {row}: expected a JSON object, got {type(record).__name__}")
            text = _checked_text(record.get(text_field), shard, row, text_field, record.keys())
            yield (_checked_id(record, id_field, shard, row), text)


def _checked_id(record: dict, id_field: str | None, shard: Shard, row: int) -> str | None:
    if id_field is None:
        return None
    value = record.get(id_field)
    if value is None:
        raise BadInputError(
            f"{shard.url} row {row}: no id in field {id_field!r}. Is --id-field correct? "
            f"Available fields: {sorted(record.keys())}"
        )
    return str(value)


def _parquet_records(fs, path, shard: Shard, text_field: str, id_field: str | None, rows_per_table: int):
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        for field in filter(None, (text_field, id_field)):
            if field not in names:
                raise BadInputError(
                    f"{shard.url}: no column {field!r}. Is --text-field/--id-field correct? Available columns: {names}"
                )
        columns = [text_field] if id_field is None else [text_field, id_field]
        row = 0
        for batch in parquet.iter_batches(batch_size=rows_per_table, columns=columns):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for text, doc_id in zip(texts, ids, strict=True):
                text = _checked_text(text, shard, row, text_field, names)
                if id_field is not None and doc_id is None:
                    raise BadInputError(f"{shard.url} row {row}: null id in column {id_field!r}")
                yield (None if doc_id is None else str(doc_id), text)
                row += 1


def _text_records(fs, path):
    with fs.open(path, "rt", compression="infer", encoding="utf-8") as lines:
        for line in lines:
            yield (None, line.rstrip("\r\n"))
