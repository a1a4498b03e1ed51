"""Find ids that occur more than once in the input, before embedding, with Ray Data's groupby, once
per input.

The first occurrence of an id is the one earliest in (shard URL, row) order, so the answer does not
depend on which task ran first or on how often the job was resumed. The repeats are written by the
workers into OUTPUT/duplicates/ (never collected on the driver), with a _done.json naming the input
they were found in: a resumed run over the same input reuses them instead of reading it all again.
Each read task then reads the repeats of its own shards only (RepeatedRows).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import JobConfig, StorageConfig
from pipeline.io.layout import DUPLICATES, atomic_write, exists_now, join
from pipeline.io.shards import ShardListing
from pipeline.io.storage import filesystem_for
from pipeline.stages.read import ShardDatasource

log = logging.getLogger(__name__)

DONE = "_done.json"
# Input bytes whose ids one task of the groupby takes: Ray Data's default of 200 partitions costs
# seconds of scheduling on a small input.
BYTES_PER_PARTITION = 1 << 30
DUPLICATES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("first_shard", pa.string()),
        ("first_row", pa.int64()),
    ]
)


@dataclass(frozen=True)
class RepeatedRows:
    """Where the rows to dead-letter as repeats are listed; read tasks ask for their own shards."""

    output_url: str
    storage: StorageConfig

    def for_shards(self, urls: list[str]) -> dict[str, dict[int, str]]:
        """shard URL -> row -> why, for the repeats among these shards."""
        fs, root = filesystem_for(self.output_url, self.storage)
        table = ds.dataset(join(root, DUPLICATES), filesystem=fs, format="parquet", schema=DUPLICATES_SCHEMA)
        found = table.to_table(filter=pc.field("shard").isin(urls)).to_pylist()
        rejected: dict[str, dict[int, str]] = {}
        for r in found:
            rejected.setdefault(r["shard"], {})[r["row"]] = (
                f"id {r['id']!r} was already seen at {r['first_shard']} row {r['first_row']}"
            )
        return rejected


def rows_to_reject(config: JobConfig, shards: ShardListing) -> RepeatedRows | None:
    """With duplicate_ids flag or reject: list repeated ids in duplicates/ (once per input); for
    reject, where the read tasks find the rows to dead-letter."""
    if config.duplicate_ids == "keep":
        return None
    fs, root = filesystem_for(config.output, config.storage)
    folder = join(root, DUPLICATES)
    digest = input_digest(shards)
    done = join(folder, DONE)
    if exists_now(fs, done) and json.loads(fs.cat_file(done)).get("input_sha256") == digest:
        log.info("repeated ids of this input were listed by an earlier run: reusing %s/", DUPLICATES)
    else:
        if fs.exists(folder):
            fs.rm(folder, recursive=True)  # an interrupted listing, or one of an earlier input
        repeats = find_duplicate_ids(shards, config.text_field, config.id_field, config.storage)
        repeats.write_parquet(folder, filesystem=PyFileSystem(FSSpecHandler(fs)), min_rows_per_file=100_000)
        found = _rows_written(fs, folder)
        atomic_write(fs, done, json.dumps({"input_sha256": digest, "repeats": found}).encode())
        log.info("%d rows repeat an earlier id; listed in %s/", found, DUPLICATES)
    return RepeatedRows(config.output, config.storage) if config.duplicate_ids == "reject" else None


def _rows_written(fs, folder: str) -> int:
    """Rows in the Parquet files under folder, from their footers: counting the dataset would read the
    whole input again. Ray writes no file (and so, on disk, no folder) when there is no repeat."""
    try:
        return ds.dataset(folder, filesystem=fs, format="parquet", schema=DUPLICATES_SCHEMA).count_rows()
    except FileNotFoundError:
        return 0


def input_digest(shards: ShardListing) -> str:
    """What the input was: every shard's URL and fingerprint."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.url}\0{shard.fingerprint}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def find_duplicate_ids(shards: ShardListing, text_field: str, id_field: str, storage: StorageConfig):
    """A dataset of every occurrence of a repeated id except its first, with where the first one is
    (DUPLICATES_SCHEMA), computed on the cluster."""
    rows = ray.data.read_datasource(ShardDatasource(shards, text_field, id_field, storage)).map_batches(
        _ids_and_places, batch_format="pyarrow"
    )
    partitions = max(1, min(200, sum(s.size_bytes for s in shards) // BYTES_PER_PARTITION))
    return rows.groupby("id", num_partitions=partitions).map_groups(_all_but_first, batch_format="pyarrow")


def _ids_and_places(batch: pa.Table) -> pa.Table:
    batch = batch.filter(pc.is_valid(batch.column("id")))  # rows whose id is missing are dead letters anyway
    return batch.select(["id", "shard", "row"])


def _all_but_first(group: pa.Table) -> pa.Table:
    """The rows of one id after its earliest one, each with the earliest place."""
    if group.num_rows < 2:
        return DUPLICATES_SCHEMA.empty_table()
    ordered = group.sort_by([("shard", "ascending"), ("row", "ascending")])
    later = ordered.slice(1)
    first_shard, first_row = ordered.column("shard")[0].as_py(), ordered.column("row")[0].as_py()
    return pa.table(
        {
            "id": later.column("id"),
            "shard": later.column("shard"),
            "row": later.column("row"),
            "first_shard": pa.array([first_shard] * later.num_rows, pa.string()),
            "first_row": pa.array([first_row] * later.num_rows, pa.int64()),
        },
        schema=DUPLICATES_SCHEMA,
    )
