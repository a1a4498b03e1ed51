"""Find ids that occur more than once in the input, before embedding, with Ray Data's groupby.

The first occurrence of an id is the one earliest in (shard path, row) order, so the answer does
not depend on which task ran first or on how often the job was resumed.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import JobConfig, StorageConfig
from pipeline.io.layout import DUPLICATES, atomic_write, join, parquet_bytes
from pipeline.io.shards import Shard
from pipeline.stages.read import ShardDatasource

log = logging.getLogger(__name__)

# Position of a row in the whole input: shard index in the high bits, row in the low ones.
ROW_BITS = 40

DUPLICATES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("first_shard", pa.string()),
        ("first_row", pa.int64()),
    ]
)


def rows_to_reject(config: JobConfig, shards: list[Shard], todo: list[Shard], fs, root: str) -> dict:
    """With duplicate_ids flag or reject: list repeated ids in duplicates.parquet; for reject, return
    the rows of the shards to do that must be dead-lettered, by shard URL (row -> why)."""
    if config.duplicate_ids == "keep":
        return {}
    repeats = find_duplicate_ids(shards, config.text_field, config.id_field, config.storage)
    atomic_write(fs, join(root, DUPLICATES), parquet_bytes(repeats))
    log.info("%d rows repeat an earlier id; listed in %s", repeats.num_rows, DUPLICATES)
    if config.duplicate_ids == "flag":
        return {}
    rejected: dict[str, dict[int, str]] = {}
    pending = {s.url for s in todo}
    for r in repeats.to_pylist():
        if r["shard"] in pending:
            rejected.setdefault(r["shard"], {})[r["row"]] = (
                f"id {r['id']!r} was already seen at {r['first_shard']} row {r['first_row']}"
            )
    return rejected


def find_duplicate_ids(shards: list[Shard], text_field: str, id_field: str, storage: StorageConfig) -> pa.Table:
    """Every occurrence of a repeated id except its first, with where the first one is (DUPLICATES_SCHEMA)."""
    index = {shard.url: i for i, shard in enumerate(shards)}
    rows = ray.data.read_datasource(ShardDatasource(shards, text_field, id_field, storage)).map_batches(
        _positions, fn_kwargs={"index": index}, batch_format="pyarrow"
    )
    later = rows.groupby("id").map_groups(_all_but_first, batch_format="pyarrow").take_all()
    urls = [shard.url for shard in shards]
    low = (1 << ROW_BITS) - 1
    later.sort(key=lambda r: r["pos"])
    return pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "shard": urls[r["pos"] >> ROW_BITS],
                "row": r["pos"] & low,
                "first_shard": urls[r["first_pos"] >> ROW_BITS],
                "first_row": r["first_pos"] & low,
            }
            for r in later
        ],
        schema=DUPLICATES_SCHEMA,
    )


def _all_but_first(group: pa.Table) -> pa.Table:
    """The rows of one id after its earliest one, each with the earliest position."""
    positions = np.sort(group.column("pos").to_numpy())
    later = positions[1:]
    return pa.table(
        {
            "id": pa.array([group.column("id")[0].as_py()] * len(later), pa.string()),
            "pos": pa.array(later, pa.int64()),
            "first_pos": pa.array(np.full(len(later), positions[0]), pa.int64()),
        }
    )


def _positions(batch: pa.Table, *, index: dict[str, int]) -> pa.Table:
    batch = batch.filter(pc.is_valid(batch.column("id")))  # rows whose id is missing are dead letters anyway
    shard_index = np.array([index[url] for url in batch.column("shard").to_pylist()], dtype=np.int64)
    positions = (shard_index << ROW_BITS) | batch.column("row").to_numpy()
    return pa.table({"id": batch.column("id"), "pos": pa.array(positions)})
