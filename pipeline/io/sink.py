"""A Ray Data datasink that writes Parquet parts under the commit protocol of manifest.py."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block

from pipeline.config import StorageConfig
from pipeline.faults import failpoint
from pipeline.io.manifest import COMMITS, STAGING, CommitRecord, atomic_write, join, move, parquet_bytes, part_name
from pipeline.io.ranges import rows_to_ranges
from pipeline.io.schemas import split_dead_letters
from pipeline.io.storage import filesystem_for


def ranges_of(table: pa.Table) -> dict[str, list[tuple[int, int]]]:
    """Which (shard, rows) a table holds, as merged row ranges per shard URL."""
    ranges = {}
    shards = table.column("shard")
    for url in pc.unique(shards).to_pylist():
        rows = table.column("row").filter(pc.equal(shards, url)).to_numpy()
        ranges[url] = rows_to_ranges(rows)
    return ranges


class CommittedParquetSink(Datasink):
    """Each write task stages one part (embeddings, and dead letters beside them), commits it with its
    row ranges, then publishes it."""

    def __init__(self, output_url: str, storage: StorageConfig, generation: int, rows_per_part: int) -> None:
        self.output_url = output_url
        self.storage = storage
        self.generation = generation
        self.rows_per_part = rows_per_part

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"parts": 0, "rows": 0}
        table = pa.concat_tables(tables)
        fs, root = filesystem_for(self.output_url, self.storage)
        ranges = ranges_of(table)
        embedded, errors = split_dead_letters(table)
        reasons = pc.value_counts(errors.column("reason")).to_pylist() if errors.num_rows else []
        commit = CommitRecord(
            part_name(ranges), table.num_rows, ranges, self.generation, {r["values"]: r["counts"] for r in reasons}
        )
        for (staged, _), data in zip(commit.files(), (t for t in (embedded, errors) if t.num_rows), strict=True):
            atomic_write(fs, join(root, STAGING, staged), parquet_bytes(data))
        failpoint("sink.after_stage")
        atomic_write(fs, join(root, COMMITS, f"{commit.part}.json"), commit.to_json())
        failpoint("sink.after_commit")
        for staged, target in commit.files():
            move(fs, join(root, STAGING, staged), join(root, target))
        return {"parts": 1, "rows": table.num_rows}
