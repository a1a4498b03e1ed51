"""The read stage: a Ray Data datasource whose read tasks each stream a run of shards, keeping shard and
row per row.

Shards are grouped into read tasks by bytes, in path order: Ray Data's driver pays about 12 ms and
10 KB per task, so a million small shards become as many tasks as the bytes need (Ray's parallelism:
about one per target block), not a million. A shard bigger than a group's share is a task of its
own, and any shard streams in bounded tables however big it is.
"""

from __future__ import annotations

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.config import StorageConfig
from pipeline.io.ranges import Range
from pipeline.io.readers import ROW_SCHEMA, read_shard
from pipeline.io.shards import Shard


class ShardDatasource(Datasource):
    """Reads JSONL / Parquet / text shards, leaving out committed rows.

    rejected (shard URL -> row -> why) are rows to dead-letter as repeated ids; or repeats
    (duplicate_ids.RepeatedRows) tells each read task those of its own shards. outcomes
    (stages.reports.ShardOutcomes) records, once per read task, which shards were read to their end
    and which failed part way; without it a file that fails part way raises BadInputError.
    """

    def __init__(
        self,
        shards: list[Shard],
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
        return sum(s.size_bytes for s in self._shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                self._reader(group),
                BlockMetadata(
                    num_rows=None,
                    size_bytes=sum(s.size_bytes for s in group),
                    exec_stats=None,
                    input_files=tuple(s.url for s in group),
                ),
                schema=ROW_SCHEMA,
            )
            for group in group_by_bytes(self._shards, parallelism)
        ]

    def _reader(self, group: list[Shard]):
        # Capture plain values, not self: the closure is shipped to a read task.
        text_field, id_field, storage, strict, outcomes = (
            self._text_field,
            self._id_field,
            self._storage,
            self._strict,
            self._outcomes,
        )
        skips = {s.url: self._skip[s.url] for s in group if s.url in self._skip}
        rejected = {s.url: self._rejected[s.url] for s in group if s.url in self._rejected}
        repeats = self._repeats

        def read():
            if repeats is not None:
                rejected.update(repeats.for_shards([s.url for s in group]))
            recorder = outcomes.recorder() if outcomes is not None else None
            for shard in group:
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


def group_by_bytes(shards: list[Shard], groups: int) -> list[list[Shard]]:
    """Consecutive shards in about `groups` runs of similar bytes; a shard above a run's share stands
    alone. At most one group per shard."""
    if not shards:
        return []
    weight = [max(1, s.size_bytes) for s in shards]  # an empty file still costs a request
    share = sum(weight) / max(1, groups)
    grouped: list[list[Shard]] = [[]]
    size = 0
    for shard, bytes_ in zip(shards, weight, strict=True):
        if grouped[-1] and size + bytes_ > share:
            grouped.append([])
            size = 0
        grouped[-1].append(shard)
        size += bytes_
    return grouped
