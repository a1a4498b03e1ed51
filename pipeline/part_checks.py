"""The checks `verify` makes over every committed part, as Ray Data jobs that read only the columns
they need: whatever the output's size, the driver holds the parts' commit records (without their
ranges) and the problems found, never a row, an id or a shard's ranges. The ranges each record claims
reach the cluster a batch of URLs at a time, as the driver reads them in URL order, and Ray Data
groups them by part there (PartClaims).

- Each part holds exactly the rows its commit record names, in the schema the run record names
  (reads shard, row and chunk).
- No id is held by two current rows (reads id, shard and chunk; Ray Data's hash-partitioned groupby
  counts each id on the worker that owns it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import StorageConfig
from pipeline.io.layout import PARTS, urls_of, with_every_column
from pipeline.io.ledger import PackedRanges
from pipeline.io.manifest import CommitRecord
from pipeline.io.recovery import UnreadablePartError, load_part, part_mismatch
from pipeline.io.storage import filesystem_for

PROBLEMS_SCHEMA = pa.schema([("part", pa.string()), ("problem", pa.string())])
IDS_SCHEMA = pa.schema([("id", pa.string())])
CLAIMS_SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        ("commit", pa.binary()),  # the record without its ranges, on the one row per part whose url is null
        ("url", pa.binary()),  # a range's shard (layout.url_column)
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("current", pa.bool_()),  # its (shard, generation) is a current version
    ]
)
PARTS_SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        ("commit", pa.binary()),  # the record with its ranges
        ("live", pa.list_(pa.string())),  # the shards whose rows in the part are current
        ("embedded", pa.int64()),
    ]
)
# Ids counted by one task of the groupby: Ray Data's default of 200 partitions costs seconds of
# scheduling on a small output.
IDS_PER_PARTITION = 5_000_000
# Parts per task of the part checks: enough to amortise a task, few enough to spread a small output.
PARTS_PER_TASK = 8


class PartClaims:
    """What the records claim of each part to check (its rows, which of them are current), gathered
    from the committed ranges as the driver reads them a batch of URLs at a time, and grouped by part
    where the checks run: on the cluster (distributed: each batch goes to Ray's object store as it is
    read, and Ray Data groups them) or here. The driver keeps a reference per batch, not the ranges."""

    def __init__(self, commits: list[CommitRecord], *, distributed: bool) -> None:
        self.wanted = pa.array(sorted(c.part for c in commits), pa.string())
        self.distributed = distributed
        self.batches: list = []
        self._keep(
            pa.table(
                {
                    "part": pa.array([c.part for c in commits], pa.string()),
                    "commit": pa.array([c.to_json(with_ranges=False) for c in commits], pa.binary()),
                },
            )
        )

    def add(self, ranges: pa.Table, current: np.ndarray) -> None:
        """ranges: committed ranges with their part (compaction.RANGES_OF_PARTS); current: whether each
        one's version is current. Ranges of other parts than those to check are left out."""
        mine = pc.is_in(ranges.column("part"), value_set=self.wanted).to_numpy(zero_copy_only=False)
        if mine.any():
            chosen = pa.array(mine)
            rows = ranges.filter(chosen).select(["part", "url", "start", "end"])
            self._keep(rows.append_column("current", pa.array(current).filter(chosen)))

    def _keep(self, table: pa.Table) -> None:
        claims = with_every_column(table, CLAIMS_SCHEMA)  # a part's row or its ranges' rows
        self.batches.append(ray.put(claims) if self.distributed else claims)

    def here(self) -> pa.Table:
        """One row per part (PARTS_SCHEMA), grouped in this process."""
        return parts_of_claims(pa.concat_tables(self.batches))

    def on_cluster(self):
        """One row per part (PARTS_SCHEMA), grouped by Ray Data, as a materialized Dataset."""
        parts = (
            ray.data.from_arrow_refs(self.batches).groupby("part").map_groups(parts_of_claims, batch_format="pyarrow")
        )
        # Blocks of PARTS_PER_TASK parts: the checks after spread over the cluster, a task per block.
        return parts.repartition(max(1, min(len(self.wanted) // PARTS_PER_TASK, 10_000))).materialize()


def parts_of_claims(claims: pa.Table) -> pa.Table:
    """Claim rows (CLAIMS_SCHEMA) of whole parts -> one row per part (PARTS_SCHEMA), by part name."""
    claims = claims.sort_by([("part", "ascending"), ("url", "ascending"), ("start", "ascending")])
    names = claims.column("part").to_numpy(zero_copy_only=False)
    heads = [0, *(np.flatnonzero(names[1:] != names[:-1]) + 1).tolist(), len(names)]
    rows: dict[str, list] = {name: [] for name in PARTS_SCHEMA.names}
    for a, b in zip(heads, heads[1:], strict=False):
        part = claims.slice(a, b - a)
        has_url = pc.is_valid(part.column("url"))
        record = pc.drop_null(part.column("commit"))
        if b <= a or len(record) == 0:  # ranges of a part not to be checked
            continue
        ranges = part.filter(has_url)
        commit = dataclasses.replace(CommitRecord.from_json(record[0].as_py()), ranges=PackedRanges.of_columns(ranges))
        live = ranges.filter(ranges.column("current")).column("url").unique()
        rows["part"].append(commit.part)
        rows["commit"].append(commit.to_json())
        rows["live"].append(urls_of(live))
        rows["embedded"].append(commit.embedded_rows)
    return pa.table(rows, schema=PARTS_SCHEMA)


def check_parts(
    parts, output_url: str, storage: StorageConfig, expected: dict, *, chunks: bool
) -> list[tuple[str, str]]:
    """(part, problem) for every part that is unreadable, holds other rows than its record, or has
    other columns than expected (folder -> the schema shapes allowed). parts: PartClaims.on_cluster()."""
    found = parts.map_batches(
        _check_batch,
        batch_size=PARTS_PER_TASK,
        batch_format="pyarrow",
        fn_kwargs=dict(output_url=output_url, storage=storage, expected=expected, chunks=chunks),
    )
    return [(r["part"], r["problem"]) for r in found.take_all()]


def check_parts_here(
    parts: pa.Table, output_url: str, storage: StorageConfig, expected: dict, *, chunks: bool
) -> list[tuple[str, str]]:
    """check_parts in this process (parts: PartClaims.here()), for a small output or a sample of parts."""
    found = _check_batch(parts, output_url=output_url, storage=storage, expected=expected, chunks=chunks)
    return list(zip(found.column("part").to_pylist(), found.column("problem").to_pylist(), strict=True))


def repeated_ids(
    parts, output_url: str, storage: StorageConfig, *, chunks: bool, examples: int
) -> tuple[int, list[str]]:
    """Ids that more than one current row holds: how many, and a few of them. parts:
    PartClaims.on_cluster()."""
    # Materialized: the sum and the ids below read the same filtered parts, not the filter twice.
    parts = parts.map_batches(_with_current_rows, batch_format="pyarrow").materialize()
    rows = parts.sum("embedded") or 0
    if not rows:
        return 0, []
    ids = parts.map_batches(
        _ids_batch,
        batch_size=PARTS_PER_TASK,
        batch_format="pyarrow",
        fn_kwargs=dict(output_url=output_url, storage=storage, chunks=chunks),
    )
    counted = ids.groupby("id", num_partitions=max(1, min(200, rows // IDS_PER_PARTITION))).count()
    repeated = counted.map_batches(_more_than_once, batch_format="pyarrow").materialize()
    found = repeated.count()
    return found, [r["id"] for r in repeated.take(examples)] if found else []


def repeated_ids_here(
    parts: pa.Table, output_url: str, storage: StorageConfig, *, chunks: bool, examples: int
) -> tuple[int, list[str]]:
    """repeated_ids in this process (parts: PartClaims.here()), for a small output: its ids fit in memory."""
    ids = _ids_batch(_with_current_rows(parts), output_url=output_url, storage=storage, chunks=chunks)
    counts = pc.value_counts(ids.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), repeated.to_pylist()[:examples]


def _with_current_rows(parts: pa.Table) -> pa.Table:
    """The parts with embedded rows that are current."""
    return parts.filter(
        pc.and_(pc.greater(parts.column("embedded"), 0), pc.greater(pc.list_value_length(parts.column("live")), 0))
    )


def _more_than_once(counts: pa.Table) -> pa.Table:
    return counts.filter(pc.greater(counts.column("count()"), 1))


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
