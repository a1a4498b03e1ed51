"""A Ray Data datasource with one streaming read task per shard, keeping shard and row per document."""

from __future__ import annotations

from collections.abc import Callable

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.config import StorageConfig
from pipeline.io.readers import ROW_SCHEMA, read_shard
from pipeline.io.shards import Shard


class ShardDatasource(Datasource):
    """Reads JSONL / Parquet / text shards; a huge shard streams in bounded tables, not one block."""

    def __init__(
        self,
        shards: list[Shard],
        text_field: str,
        id_field: str | None,
        storage: StorageConfig,
        on_shard_read: Callable[[Shard], None] | None = None,
    ) -> None:
        self._shards = shards
        self._text_field = text_field
        self._id_field = id_field
        self._storage = storage
        self._on_shard_read = on_shard_read

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
        text_field, id_field, storage, on_shard_read = (
            self._text_field,
            self._id_field,
            self._storage,
            self._on_shard_read,
        )

        def read():
            yield from read_shard(shard, text_field, id_field, storage)
            if on_shard_read is not None:
                on_shard_read(shard)

        return read
