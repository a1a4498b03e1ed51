"""Find ids that occur more than once in the input, before embedding, with Ray Data's groupby: each
shard's ids read once, not once per run.

The first occurrence of an id is the one earliest in (shard URL, row) order, so the answer does not
depend on which task ran first, on how often the job was resumed, or on how the input grew. The
repeats are written by the workers into OUTPUT/duplicates/ (never collected on the driver), with a
_done.json naming the input they were found in: a resumed run over the same input reuses them. Each
read task then reads the repeats of its own shards only (RepeatedRows).

The ids themselves are kept too, in duplicates/_ids/ (IdIndex): every id with its shard and row,
written by the workers a pass at a time, each pass beside the list of shard versions it read. When
the input changes (new shards, or a --refresh's changed and deleted ones), only the shard versions no
pass has read are read from the input; the repeats are then found again from the kept ids of the
current versions, a column of ids rather than the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import JobConfig, StorageConfig
from pipeline.io.layout import (
    DUPLICATES,
    atomic_write,
    exists_now,
    join,
    name_of,
    parquet_bytes,
    remove_many,
    url_texts,
)
from pipeline.io.shards import ShardListing
from pipeline.io.storage import filesystem_for
from pipeline.stages.read import ShardDatasource

log = logging.getLogger(__name__)

DONE = "_done.json"
IDS = "_ids"
PASS_SHARDS = ".shards.parquet"
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
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("row", pa.int64())])


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
    """With duplicate_ids flag or reject: list repeated ids in duplicates/ (once per input, reading
    only the shards no earlier listing read); for reject, where the read tasks find the rows to
    dead-letter."""
    if config.duplicate_ids == "keep":
        return None
    fs, root = filesystem_for(config.output, config.storage)
    folder = join(root, DUPLICATES)
    digest = input_digest(shards)
    done = join(folder, DONE)
    if exists_now(fs, done) and json.loads(fs.cat_file(done)).get("input_sha256") == digest:
        log.info("repeated ids of this input were listed by an earlier run: reusing %s/", DUPLICATES)
    else:
        _remove_repeats(fs, folder)  # an interrupted listing, or one of an earlier input
        index = IdIndex(fs, join(folder, IDS))
        index.add(shards, config)
        repeats = index.repeats(shards)
        if repeats is not None:
            repeats.write_parquet(folder, filesystem=PyFileSystem(FSSpecHandler(fs)), min_rows_per_file=100_000)
        found = _rows_written(fs, folder)
        atomic_write(fs, done, json.dumps({"input_sha256": digest, "repeats": found}).encode())
        log.info("%d rows repeat an earlier id; listed in %s/", found, DUPLICATES)
    return RepeatedRows(config.output, config.storage) if config.duplicate_ids == "reject" else None


def _remove_repeats(fs, folder: str) -> None:
    """The listed repeats and their _done.json (first: a crash midway leaves no list that claims to be
    whole); the kept ids stay."""
    if not fs.exists(folder):
        return
    remove_many(fs, [join(folder, DONE)] if exists_now(fs, join(folder, DONE)) else [])
    remove_many(fs, [p for p in fs.ls(folder, detail=False) if not name_of(p).startswith("_")])


class IdIndex:
    """Every id of the input with its shard and row (INDEX_SCHEMA), kept in passes: _ids/<n>/ holds the
    ids of the shard versions _ids/<n>.shards.parquet lists (url, fingerprint). The list is written
    after the ids, so a pass without one was interrupted and is removed. A version that is no longer
    the input's (its shard changed or vanished) stays in its pass and is left out when reading."""

    def __init__(self, fs, folder: str) -> None:
        self.fs, self.folder = fs, folder
        self.passes: dict[int, pa.Table] = {}
        self.fresh: dict[int, ray.data.Dataset] = {}  # the passes this process read, still in the object store
        names = {name_of(p): p for p in fs.ls(folder, detail=False)} if fs.exists(folder) else {}
        for name, path in sorted(names.items()):
            if name.endswith(PASS_SHARDS):
                with fs.open(path, "rb") as f:
                    self.passes[int(name.removesuffix(PASS_SHARDS))] = pq.read_table(f)
            elif name.isdigit() and f"{name}{PASS_SHARDS}" not in names:
                fs.rm(path, recursive=True)  # a pass interrupted before its list of shards

    def add(self, shards: ShardListing, config: JobConfig) -> None:
        """Read the ids of the shards no pass has read, as a new pass."""
        new = shards.take(np.flatnonzero(~self._indexed(shards.table)))
        if not len(new):
            return
        number = max(self.passes, default=-1) + 1
        path = join(self.folder, f"{number:06d}")
        log.info("reading the ids of %d shards not read before", len(new))
        rows = ray.data.read_datasource(ShardDatasource(new, config.text_field, config.id_field, config.storage))
        # Materialized (in Ray's object store, spilled as it fills), so that the read runs in parallel
        # rather than fused into the write's few big files, and the groupby after reads it from there.
        ids = rows.map_batches(_ids_and_places, batch_format="pyarrow").materialize()
        ids.write_parquet(path, filesystem=PyFileSystem(FSSpecHandler(self.fs)), min_rows_per_file=1_000_000)
        versions = new.table.select(["url", "fingerprint"])
        atomic_write(self.fs, f"{path}{PASS_SHARDS}", parquet_bytes(versions))
        self.passes[number] = versions
        self.fresh[number] = ids

    def repeats(self, shards: ShardListing):
        """A dataset of every occurrence of a repeated id among these shards' versions except its
        first, with where the first one is (DUPLICATES_SCHEMA), computed on the cluster from the kept
        ids; None when no pass holds an id."""
        current = _version_keys(shards.table)
        datasets = []
        for number, versions in sorted(self.passes.items()):
            path = join(self.folder, f"{number:06d}")
            if not self.fs.exists(path):  # a pass of shards without an id: Ray writes no file
                continue
            if number in self.fresh:
                ids = self.fresh[number]
            else:
                ids = ray.data.read_parquet(path, filesystem=PyFileSystem(FSSpecHandler(self.fs)), schema=INDEX_SCHEMA)
            gone = versions.filter(pc.invert(pc.is_in(_version_keys(versions), value_set=current)))
            if gone.num_rows:
                superseded = url_texts(gone.column("url"))
                ids = ids.map_batches(_without_shards, batch_format="pyarrow", fn_kwargs={"shards": superseded})
            datasets.append(ids)
        if not datasets:
            return None
        partitions = max(1, min(200, shards.size_bytes // BYTES_PER_PARTITION))
        ids = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        return ids.groupby("id", num_partitions=partitions).map_groups(_all_but_first, batch_format="pyarrow")

    def _indexed(self, listed: pa.Table) -> np.ndarray:
        """Whether a pass has read each listed shard's version."""
        if not self.passes:
            return np.zeros(listed.num_rows, dtype=bool)
        read = pa.concat_tables(self.passes.values())
        return pc.is_in(_version_keys(listed), value_set=_version_keys(read)).to_numpy(zero_copy_only=False)


def _version_keys(table: pa.Table) -> pa.Array:
    """url and fingerprint of each row as one binary key."""
    fingerprint = pc.cast(table.column("fingerprint"), pa.binary())
    return pc.binary_join_element_wise(table.column("url"), fingerprint, b"\0").combine_chunks()


def _without_shards(batch: pa.Table, *, shards: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("shard"), value_set=shards)))


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


def _ids_and_places(batch: pa.Table) -> pa.Table:
    batch = batch.filter(pc.is_valid(batch.column("id")))  # rows whose id is missing are dead letters anyway
    return batch.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


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
