"""The read stage: a Ray Data datasource whose read tasks each stream a run of shards, keeping shard and
row per row.

Shards are grouped into read tasks by bytes, in path order: Ray Data's driver pays about 12 ms and
10 KB per task, so a million small shards become as many tasks as the bytes need (Ray's parallelism:
about one per target block), not a million. A shard bigger than a group's share is a task of its
own, and any shard streams in bounded tables however big it is. The job's shards come as a file in
the output (io/todo.py): a task carries only its rows' numbers, and reads its shards where it runs.
"""

from __future__ import annotations

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.config import StorageConfig
from pipeline.io.ranges import Range
from pipeline.io.readers import ROW_SCHEMA, read_shard
from pipeline.io.shards import ShardListing
from pipeline.io.todo import RunOfShards, ShardsToRead


class ShardDatasource(Datasource):
    """Reads JSONL / Parquet / text shards, leaving out committed rows.

    shards: a listing (each task gets a copy of its own shards), or a file of them (ShardsToRead, which
    also says which rows are committed). With a listing, skip (URL -> committed row ranges) and
    rejected (shard URL -> row -> why) are rows to leave out and to dead-letter as repeated ids; repeats
    (duplicate_ids.RepeatedRows) tells each read task those of its own shards. outcomes
    (stages.reports.ShardOutcomes) records, once per read task, which shards were read to their end
    and which failed part way; without it a file that fails part way raises BadInputError.
    """

    def __init__(
        self,
        shards: ShardListing | ShardsToRead,
        text_field: str,
        id_field: str | None,
        storage: StorageConfig,
        *,
        skip: dict[str, list[Range]] | None = None,
        rejected: dict[str, dict[int, str]] | None = None,
        repeats=None,
        strict: bool = False,
        outcomes=None,
    ) -> None:
        self._shards = shards
        self._skip = skip or {}
        self._rejected = rejected or {}
        self._repeats = repeats
        self._text_field = text_field
        self._id_field = id_field
        self._storage = storage
        self._strict = strict
        self._outcomes = outcomes

    def estimate_inmemory_data_size(self) -> int:
        return self._shards.size_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # No input_files: Ray only reports them, and the driver would hold every shard's URL for the run.
        sizes = self._shards.sizes()
        return [
            ReadTask(
                self._reader(self._shards.run_of(start, stop)),
                BlockMetadata(
                    num_rows=None, size_bytes=int(sizes[start:stop].sum()), exec_stats=None, input_files=None
                ),
                schema=ROW_SCHEMA,
            )
            for start, stop in byte_runs(sizes, parallelism)
        ]

    def groups(self, parallelism: int) -> list[ShardListing | RunOfShards]:
        """The shards of each read task (byte_runs): a listing's copied into a listing of their own (a
        task pickles its own shards' columns, never the whole listing's), a file's as its rows' numbers."""
        return [self._shards.run_of(start, stop) for start, stop in byte_runs(self._shards.sizes(), parallelism)]

    def _reader(self, group: ShardListing | RunOfShards):
        # Capture plain values, not self: the closure is shipped to a read task.
        text_field, id_field, storage, strict, outcomes = (
            self._text_field,
            self._id_field,
            self._storage,
            self._strict,
            self._outcomes,
        )
        listed = isinstance(group, ShardListing)
        urls = group.urls() if listed and (self._skip or self._rejected) else []
        skips = {url: self._skip[url] for url in urls if url in self._skip}
        rejected = {url: self._rejected[url] for url in urls if url in self._rejected}
        repeats = self._repeats

        def read():
            shards = group
            if not listed:
                shards, committed = group.read()
                skips.update(committed)
            if repeats is not None:
                rejected.update(repeats.for_shards(shards.urls()))
            recorder = outcomes.recorder() if outcomes is not None else None
            for shard in shards:
                yield from read_shard(
                    shard,
                    text_field,
                    id_field,
                    storage,
                    skip=skips.get(shard.url, []),
                    rejected=rejected.get(shard.url),
                    strict=strict,
                    on_end=(lambda rows, shard=shard: recorder.read_to_end(shard, rows)) if recorder else None,
                    on_file_error=(lambda rows, problem, shard=shard: recorder.failed(shard, rows, problem))
                    if recorder
                    else None,
                )
            if recorder is not None:
                recorder.close()

        return read


def byte_runs(sizes: np.ndarray, groups: int) -> list[tuple[int, int]]:
    """Consecutive shards, by their sizes, in about `groups` runs (start, stop) of similar bytes; a
    shard above a run's share stands alone. At most one run per shard."""
    if not len(sizes):
        return []
    weight = np.maximum(sizes, 1)  # an empty file still costs a request
    share = weight.sum() / max(1, groups)
    runs, start, size = [], 0, 0
    for i, bytes_ in enumerate(weight.tolist()):
        if i > start and size + bytes_ > share:
            runs.append((start, i))
            start, size = i, 0
        size += bytes_
    runs.append((start, len(weight)))
    return runs
