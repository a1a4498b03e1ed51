"""The read stage: a Ray Data datasource with one streaming read task per shard, keeping shard and row per row."""

from __future__ import annotations

from collections.abc import Callable

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.config import StorageConfig
from pipeline.io.ranges import Range
from pipeline.io.readers import ROW_SCHEMA, FileProblem, read_shard
from pipeline.io.shards import Shard


class ShardDatasource(Datasource):
    """Reads JSONL / Parquet / text shards, leaving out committed rows; huge shards stream in bounded tables."""

    def __init__(
        self,
        shards: list[Shard],
        text_field: str,
        id_field: str | None,
        storage: StorageConfig,
        *,
        skip: dict[str, list[Range]] | None = None,
        rejected: dict[str, dict[int, str]] | None = None,
        strict: bool = False,
        on_shard_read: Callable[[Shard, int], None] | None = None,
        on_file_error: Callable[[Shard, int, FileProblem], None] | None = None,
    ) -> None:
        self._shards = shards
        self._skip = skip or {}
        self._rejected = rejected or {}
        self._text_field = text_field
        self._id_field = id_field
        self._storage = storage
        self._strict = strict
        self._on_shard_read = on_shard_read
        self._on_file_error = on_file_error

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.size_bytes for s in self._shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                self._reader(shard),
                BlockMetadata(num_rows=None, size_bytes=shard.size_bytes, exec_stats=None, input_files=(shard.url,)),
                schema=ROW_SCHEMA,
            )
            for shard in self._shards
        ]

    def _reader(self, shard: Shard):
        # Capture plain values, not self: the closure is shipped to a read task.
        text_field, id_field, storage, strict = self._text_field, self._id_field, self._storage, self._strict
        on_shard_read, on_file_error = self._on_shard_read, self._on_file_error
        skip, rejected = self._skip.get(shard.url, []), self._rejected.get(shard.url)

        def read():
            yield from read_shard(
                shard,
                text_field,
                id_field,
                storage,
                skip=skip,
                rejected=rejected,
                strict=strict,
                on_end=(lambda rows: on_shard_read(shard, rows)) if on_shard_read else None,
                on_file_error=(lambda rows, problem: on_file_error(shard, rows, problem)) if on_file_error else None,
            )

        return read
