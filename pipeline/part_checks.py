"""The checks `verify` makes over every committed part, as Ray Data jobs that read only the columns
they need: whatever the output's size, the driver holds the parts' commit records and the problems
found, never a row or an id.

- Each part holds exactly the rows its commit record names, in the schema the run record names
  (reads shard, row and chunk).
- No id is held by two current rows (reads id, shard and chunk; Ray Data's hash-partitioned groupby
  counts each id on the worker that owns it).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import StorageConfig
from pipeline.io.layout import PARTS
from pipeline.io.manifest import CommitRecord
from pipeline.io.recovery import UnreadablePartError, load_part, part_mismatch
from pipeline.io.storage import filesystem_for

PROBLEMS_SCHEMA = pa.schema([("part", pa.string()), ("problem", pa.string())])
IDS_SCHEMA = pa.schema([("id", pa.string())])
# Ids counted by one task of the groupby: Ray Data's default of 200 partitions costs seconds of
# scheduling on a small output.
IDS_PER_PARTITION = 5_000_000
# Parts per task of the part checks: enough to amortise a task, few enough to spread a small output.
PARTS_PER_TASK = 8


def check_parts(
    output_url: str, storage: StorageConfig, commits: list[CommitRecord], expected: dict, *, chunks: bool
) -> list[tuple[str, str]]:
    """(part, problem) for every part that is unreadable, holds other rows than its record, or has
    other columns than expected (folder -> the schema shapes allowed)."""
    if not commits:
        return []
    found = _commits_dataset(commits).map_batches(
        _check_batch,
        batch_size=PARTS_PER_TASK,
        batch_format="pyarrow",
        fn_kwargs=dict(output_url=output_url, storage=storage, expected=expected, chunks=chunks),
    )
    return [(r["part"], r["problem"]) for r in found.take_all()]


def check_parts_here(
    output_url: str, storage: StorageConfig, commits: list[CommitRecord], expected: dict, *, chunks: bool
) -> list[tuple[str, str]]:
    """check_parts in this process, for a few parts (verify --sample)."""
    table = pa.table({"commit": [c.to_json() for c in commits]})
    found = _check_batch(table, output_url=output_url, storage=storage, expected=expected, chunks=chunks)
    return list(zip(found.column("part").to_pylist(), found.column("problem").to_pylist(), strict=True))


def repeated_ids(
    output_url: str,
    storage: StorageConfig,
    current_parts: list[tuple[CommitRecord, list[str]]],
    *,
    chunks: bool,
    examples: int,
) -> tuple[int, list[str]]:
    """Ids that more than one current row holds: how many, and a few of them. current_parts: each part
    with current rows, and the shards whose rows in it are current."""
    if not current_parts:
        return 0, []
    ids = _dataset(_current_parts_table(current_parts)).map_batches(
        _ids_batch,
        batch_size=PARTS_PER_TASK,
        batch_format="pyarrow",
        fn_kwargs=dict(output_url=output_url, storage=storage, chunks=chunks),
    )
    rows = sum(c.embedded_rows for c, _ in current_parts)
    counted = ids.groupby("id", num_partitions=max(1, min(200, rows // IDS_PER_PARTITION))).count()
    repeated = counted.map_batches(_more_than_once, batch_format="pyarrow").materialize()
    found = repeated.count()
    return found, [r["id"] for r in repeated.take(examples)] if found else []


def repeated_ids_here(
    output_url: str,
    storage: StorageConfig,
    current_parts: list[tuple[CommitRecord, list[str]]],
    *,
    chunks: bool,
    examples: int,
) -> tuple[int, list[str]]:
    """repeated_ids in this process, for a small output (verify's local_rows): its ids fit in memory."""
    if not current_parts:
        return 0, []
    ids = _ids_batch(_current_parts_table(current_parts), output_url=output_url, storage=storage, chunks=chunks)
    counts = pc.value_counts(ids.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), repeated.to_pylist()[:examples]


def _current_parts_table(current_parts: list[tuple[CommitRecord, list[str]]]) -> pa.Table:
    return pa.table(
        {
            "commit": [c.to_json() for c, _ in current_parts],
            "live": pa.array([shards for _, shards in current_parts], pa.list_(pa.string())),
        }
    )


def _more_than_once(counts: pa.Table) -> pa.Table:
    return counts.filter(pc.greater(counts.column("count()"), 1))


def _commits_dataset(commits: list[CommitRecord]):
    return _dataset(pa.table({"commit": [c.to_json() for c in commits]}))


def _dataset(table: pa.Table):
    blocks = max(1, min(table.num_rows // PARTS_PER_TASK, 10_000))
    return ray.data.from_arrow(table).repartition(blocks)


def _check_batch(batch: pa.Table, *, output_url: str, storage: StorageConfig, expected: dict, chunks: bool) -> pa.Table:
    fs, root = filesystem_for(output_url, storage)
    parts, problems = [], []
    for raw in batch.column("commit").to_pylist():
        commit = CommitRecord.from_json(raw)
        try:
            tables, schemas = load_part(fs, root, commit, ["shard", "row", "chunk"])
        except UnreadablePartError as err:
            parts.append(commit.part)
            problems.append(f"{err}; repair quarantines it and a re-run embeds its rows again")
            continue
        for folder, schema in schemas.items():
            shape = schema_shape(schema)
            if shape not in expected[folder]:
                parts.append(commit.part)
                problems.append(f"{folder}/{commit.part}.parquet has columns {shape}, expected {expected[folder][0]}")
        mismatch = part_mismatch(commit, tables, chunks=chunks)
        if mismatch:
            parts.append(commit.part)
            problems.append(f"{mismatch}; repair quarantines it and a re-run embeds its rows again")
    return pa.table({"part": parts, "problem": problems}, schema=PROBLEMS_SCHEMA)


def _ids_batch(batch: pa.Table, *, output_url: str, storage: StorageConfig, chunks: bool) -> pa.Table:
    fs, root = filesystem_for(output_url, storage)
    tables = []
    for raw, live in zip(batch.column("commit").to_pylist(), batch.column("live").to_pylist(), strict=True):
        commit = CommitRecord.from_json(raw)
        try:
            embedded = load_part(fs, root, commit, ["id", "chunk", "shard"])[0].get(PARTS)
        except UnreadablePartError:
            continue  # the part check reports it
        if embedded is None:
            continue
        current = pc.is_in(embedded.column("shard"), pa.array(live, pa.string()))
        if chunks:
            current = pc.and_(current, pc.equal(embedded.column("chunk"), 0))  # one row per document
        tables.append(pa.table({"id": embedded.filter(current).column("id").cast(pa.string())}))
    return pa.concat_tables(tables) if tables else IDS_SCHEMA.empty_table()


def schema_shape(schema: pa.Schema) -> list[tuple]:
    """Column names and types, ignoring the name of a list's child field (Parquet writers differ)."""
    shape = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            shape.append((f.name, f"fixed_size_list<{f.type.value_type}>[{f.type.list_size}]"))
        else:
            shape.append((f.name, str(f.type)))
    return shape
