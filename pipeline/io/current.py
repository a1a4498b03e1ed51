"""The current view of an output: for every current shard, its rows of the generation that holds its
current version (generations.py). Superseded rows stay in their parts until vacuum; readers filter
them out by (shard, generation), which needs no rewrite of old parts.

current_rows() streams the view as Arrow record batches, part by part, reading only the parts that
hold a current row; `neobert-pipeline export` writes it as plain Parquet. The same view in SQL
(DuckDB), for outputs whose parts carry the generation column (manifest version 2):

    WITH versions AS (
        SELECT shard, generation, change,
               row_number() OVER (PARTITION BY shard ORDER BY generation DESC) AS newest
        FROM read_parquet('OUTPUT/_inputs/*.parquet'))
    SELECT p.* FROM read_parquet('OUTPUT/parts/*.parquet') AS p
    JOIN versions AS v ON p.shard = v.shard AND p.generation = v.generation
    WHERE v.newest = 1 AND v.change <> 'deleted'
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.errors import NoInputError, OutputConflictError
from pipeline.io.generations import recorded_inputs
from pipeline.io.layout import ERRORS, PARTS, RUN_RECORD, join, urls_of
from pipeline.io.ledger import INPUT_COLUMNS, among, current_versions
from pipeline.io.manifest import CommitRecord, read_state
from pipeline.io.run_record import read_run_record
from pipeline.io.schemas import GENERATION_FIELD
from pipeline.io.storage import filesystem_for

ROWS_PER_BATCH = 65_536


def current_rows(
    output_url: str,
    storage: StorageConfig | None = None,
    *,
    columns: list[str] | None = None,
    dead_letters: bool = False,
) -> pa.RecordBatchReader:
    """Every current row of the output (of errors/ with dead_letters), streamed part by part.

    columns: the columns to return (default all); the rows come in the order of the parts' names.
    """
    fs, root = filesystem_for(output_url, storage or StorageConfig())
    record = read_run_record(fs, root)
    if record is None:
        raise NoInputError(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
    current = current_versions(recorded_inputs(fs, root, record, INPUT_COLUMNS))
    folder = ERRORS if dead_letters else PARTS
    parts = current_parts(read_state(fs, root).commits, current, dead_letters=dead_letters)
    schema = _schema(fs, root, folder, parts, columns)
    return pa.RecordBatchReader.from_batches(schema, _batches(fs, root, folder, parts, schema))


def current_parts(
    commits: list[CommitRecord], current: pa.Table, *, dead_letters: bool = False
) -> list[tuple[CommitRecord, list[str]]]:
    """(commit, its shards whose rows are current) of every part holding a current row, by part name;
    current: the current versions (ledger.current_versions)."""
    commits = sorted((c for c in commits if (c.error_rows if dead_letters else c.embedded_rows)), key=lambda c: c.part)
    return [(c, shards) for c, shards in zip(commits, current_shards(commits, current), strict=True) if shards]


def current_shards(commits: list[CommitRecord], current: pa.Table) -> list[list[str]]:
    """For each commit, the shards whose rows in it are current: their current version is of its
    generation. One lookup for all commits' ranges together, not one per part."""
    tables = [c.ranges_table() for c in commits]
    if not tables:
        return []
    ranges = pa.concat_tables(tables)
    live = among(ranges, current)
    part_of = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])[live]
    shards: list[dict[str, None]] = [{} for _ in commits]  # a shard with several ranges in a part, once
    for part, url in zip(part_of.tolist(), urls_of(ranges.column("url").filter(pa.array(live))), strict=True):
        shards[part][url] = None
    return [list(urls) for urls in shards]


def _schema(fs: fsspec.AbstractFileSystem, root: str, folder: str, parts, columns) -> pa.Schema:
    if not parts:
        return pa.schema([])
    with fs.open(join(root, folder, f"{parts[0][0].part}.parquet"), "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
    if GENERATION_FIELD.name not in schema.names:  # a part written before manifest version 2
        schema = schema.append(GENERATION_FIELD)
    return schema if columns is None else pa.schema([schema.field(name) for name in columns])


def _batches(fs, root: str, folder: str, parts, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for commit, shards in parts:
        table = part_current_rows(fs, root, commit, shards, folder=folder)
        yield from table.select(schema.names).cast(schema).to_batches(ROWS_PER_BATCH)


def part_current_rows(
    fs, root: str, commit: CommitRecord, shards: list[str], *, folder: str = PARTS, columns: list[str] | None = None
) -> pa.Table:
    """The rows of one part that belong to `shards` (its current ones), with the generation column."""
    read = None if columns is None else sorted({*columns, "shard"} - {GENERATION_FIELD.name})
    with fs.open(join(root, folder, f"{commit.part}.parquet"), "rb") as f:
        table = pq.read_table(f, columns=read)
    if GENERATION_FIELD.name not in table.column_names:
        table = table.append_column(
            GENERATION_FIELD, pa.array([commit.generation] * table.num_rows, GENERATION_FIELD.type)
        )
    return table.filter(pc.is_in(table.column("shard"), pa.array(shards, pa.string())))


def export_current(
    output_url: str,
    dest_url: str,
    storage: StorageConfig | None = None,
    *,
    rows_per_file: int = 1_000_000,
    dead_letters: bool = False,
) -> tuple[int, int]:
    """Write the current view as plain Parquet files under dest_url (which must hold none yet);
    (files, rows) written."""
    storage = storage or StorageConfig()
    fs, dest = filesystem_for(dest_url, storage)
    if fs.exists(dest) and fs.ls(dest):
        raise OutputConflictError(f"{dest_url} is not empty; export into a new folder")
    fs.makedirs(dest, exist_ok=True)
    reader = current_rows(output_url, storage, dead_letters=dead_letters)
    files, rows, in_file, sink, writer = 0, 0, 0, None, None
    try:
        for batch in reader:
            if writer is None or in_file >= rows_per_file:
                _close(writer, sink)
                sink = fs.open(join(dest, f"part-{files:05d}.parquet"), "wb")
                writer = pq.ParquetWriter(sink, reader.schema, compression="zstd")
                files, in_file = files + 1, 0
            writer.write_batch(batch)
            in_file += batch.num_rows
            rows += batch.num_rows
    finally:
        _close(writer, sink)
    return files, rows


def _close(writer, sink) -> None:
    if writer is not None:
        writer.close()
    if sink is not None:
        sink.close()  # an object store uploads the file here
