"""The shards a run's graph reads, written into the output before the graph starts: each read task
reads its own run of the file's rows, so the driver holds neither the listing nor a copy of it per task.

At 10^6 shards the listing's columns took the driver about 120 MB for the whole run, and the read
tasks' own copies of their shards (kept by Ray Data until each task has run, and pickled to send)
about 270 MB more (benchmarks/RESULTS.md). The file also holds the row ranges of each shard that are
committed already, which a read task leaves out: a crashed run's ranges need not travel in every task.

_todo/<generation>.parquet is the lease holder's alone, written again by the run that next does that
generation's work, and removed when a run ends well. _todo/ids-<pass>.parquet, the shards whose ids a
--duplicate-ids pass reads (duplicate_ids.IdIndex), goes once they are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.io.layout import TODO, join, urls_of
from pipeline.io.ranges import Range, count_rows
from pipeline.io.shards import LISTING_SCHEMA, ShardListing
from pipeline.io.storage import filesystem_for

RANGE = pa.struct([("start", pa.int64()), ("end", pa.int64())])
TODO_SCHEMA = LISTING_SCHEMA.append(pa.field("committed", pa.list_(RANGE)))
ROW_GROUP_SHARDS = 4_096
"""Shards per row group: a read task of a few shards reads one or two groups, not the file."""


@dataclass(frozen=True)
class ShardsToRead:
    """A generation's shards to read, as a file in the output (TODO_SCHEMA, in the listing's order)."""

    url: str
    storage: StorageConfig
    shards: int
    size_bytes: int
    committed_rows: int
    """Rows of these shards that earlier runs committed already: left out of the read."""

    def __len__(self) -> int:
        return self.shards

    def sizes(self) -> np.ndarray:
        """Each shard's bytes, in the file's order (8 B a shard, for grouping them into read tasks)."""
        fs, path = filesystem_for(self.url, self.storage)
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=["size_bytes"]).column("size_bytes").to_numpy()

    def run_of(self, start: int, stop: int) -> RunOfShards:
        return RunOfShards(self.url, self.storage, start, stop)

    def remove(self) -> None:
        fs, path = filesystem_for(self.url, self.storage)
        fs.rm(path)


@dataclass(frozen=True)
class RunOfShards:
    """Rows start to stop of a ShardsToRead file: one read task's shards, read where the task runs."""

    url: str
    storage: StorageConfig
    start: int
    stop: int

    def read(self) -> tuple[ShardListing, dict[str, list[Range]]]:
        """These shards, and URL -> the row ranges already committed of those that have any."""
        fs, path = filesystem_for(self.url, self.storage)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            ends = np.cumsum([parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
            first, last = np.searchsorted(ends, self.start, "right"), np.searchsorted(ends, self.stop - 1, "right")
            groups = list(range(int(first), int(last) + 1))
            offset = int(ends[first - 1]) if first else 0
            table = parquet.read_row_groups(groups).slice(self.start - offset, self.stop - self.start)
        with_ranges = table.filter(pc.is_valid(table.column("committed")))
        committed = dict(
            zip(
                urls_of(with_ranges.column("url")),
                ([(r["start"], r["end"]) for r in ranges] for ranges in with_ranges.column("committed").to_pylist()),
                strict=True,
            )
        )
        return ShardListing(table.select(LISTING_SCHEMA.names)), committed


def todo_url(output_url: str, name: str) -> str:
    """Where in the output the shards to read of this name go (a generation's: its number)."""
    return join(output_url, TODO, f"{name}.parquet")


def write_shards_to_read(
    url: str, storage: StorageConfig, shards: ShardListing, committed: dict[str, list[Range]] | None = None
) -> ShardsToRead:
    """Write these shards, with their committed ranges, to url (todo_url), streamed a row group at a
    time: never a second copy of the listing in memory."""
    committed = committed or {}
    fs, path = filesystem_for(url, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, TODO_SCHEMA, compression="zstd") as writer:
        for table in _with_committed(shards, committed):
            writer.write_table(table, ROW_GROUP_SHARDS)
    return ShardsToRead(
        url,
        storage,
        len(shards),
        shards.size_bytes,
        sum(count_rows(ranges) for ranges in committed.values()),
    )


def _with_committed(shards: ShardListing, committed: dict[str, list[Range]]) -> Iterator[pa.Table]:
    for batch in shards.table.to_batches(max_chunksize=ROW_GROUP_SHARDS):
        if committed:
            ranges = [committed.get(url) for url in urls_of(batch.column("url"))]
            column = pa.array(
                [None if rs is None else [{"start": s, "end": e} for s, e in rs] for rs in ranges], pa.list_(RANGE)
            )
        else:
            column = pa.nulls(batch.num_rows, pa.list_(RANGE))
        yield pa.Table.from_batches([batch]).append_column(TODO_SCHEMA.field("committed"), column)


def remove_shards_to_read(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Every generation's file: a run that ended well has read them all."""
    path = join(root, TODO)
    if fs.exists(path):
        fs.rm(path, recursive=True)
