"""Find ids that occur more than once in the input, before embedding, with Ray Data's groupby: each
shard's ids read once, not once per run.

The first occurrence of an id is the one earliest in (shard URL, row) order, so the answer does not
depend on which task ran first or on how often the job was resumed. The repeats are written by the
workers into OUTPUT/duplicates/listing-<input>/ (never collected on the driver), and _done.json
names the listing and the input it was made from: a resumed run over the same input reuses it. Each
read task then reads the repeats of its own shards only (RepeatedRows).

When the input changes, reject keeps what the output already holds (Ranks): a row of a shard
version the last listing saw keeps its place, first or repeat, ahead of the rows of versions added
or changed since, which are first only for an id none of those holds. Rejected rows are dead
letters, never embedded again unless their shard changes: an id whose only kept row was in a shard
changed or deleted since has its earliest rejected row as its first now, listed as such
(first_shard null) and counted in _done.json ("no_longer_repeats") and the log, as those rows
stay dead letters if they were already read. The last listing is kept until the new one is named
in _done.json, so a crash in between leaves it to compare with.

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
from pipeline.faults import failpoint
from pipeline.io.generations import recorded_inputs
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
from pipeline.io.ledger import INPUT_COLUMNS, current_versions
from pipeline.io.run_record import read_run_record
from pipeline.io.shards import ShardListing
from pipeline.io.storage import filesystem_for
from pipeline.io.todo import todo_url, write_shards_to_read
from pipeline.stages.read import ShardDatasource

log = logging.getLogger(__name__)

DONE = "_done.json"
IDS = "_ids"
LISTING = "listing-"
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
RANKED_SCHEMA = INDEX_SCHEMA.append(pa.field("rank", pa.int8()))
# reject's order of an id's occurrences, before (shard, row): see Ranks.
KEPT, NEW, REJECTED_BEFORE = 0, 1, 2


@dataclass(frozen=True)
class RepeatedRows:
    """Where the rows to dead-letter as repeats are listed; read tasks ask for their own shards."""

    output_url: str
    storage: StorageConfig
    listing: str
    """The listing's folder under duplicates/; '' for one made before listings had folders."""

    def for_shards(self, urls: list[str]) -> dict[str, dict[int, str]]:
        """shard URL -> row -> why, for the repeats among these shards."""
        fs, root = filesystem_for(self.output_url, self.storage)
        files = _listing_files(fs, join(root, DUPLICATES), self.listing)
        if not files:
            return {}
        table = ds.dataset(files, filesystem=fs, format="parquet", schema=DUPLICATES_SCHEMA)
        wanted = pc.field("shard").isin(urls) & pc.field("first_shard").is_valid()  # null: no longer a repeat
        rejected: dict[str, dict[int, str]] = {}
        for r in table.to_table(filter=wanted).to_pylist():
            rejected.setdefault(r["shard"], {})[r["row"]] = (
                f"id {r['id']!r} was already seen at {r['first_shard']} row {r['first_row']}"
            )
        return rejected


def _listing_files(fs, folder: str, listing: str) -> list[str]:
    """The Parquet files of a listing (listing '': those directly in folder, as before listings had
    folders of their own)."""
    path = join(folder, listing) if listing else folder
    try:
        found = fs.find(path) if listing else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(".parquet") and not name_of(p).startswith(("_", ".")))


def rows_to_reject(config: JobConfig, shards: ShardListing) -> RepeatedRows | None:
    """With duplicate_ids flag or reject: list repeated ids in duplicates/ (once per input, reading
    only the shards no earlier listing read); for reject, where the read tasks find the rows to
    dead-letter."""
    if config.duplicate_ids == "keep":
        return None
    fs, root = filesystem_for(config.output, config.storage)
    folder = join(root, DUPLICATES)
    digest = input_digest(shards)
    last = json.loads(fs.cat_file(join(folder, DONE))) if exists_now(fs, join(folder, DONE)) else None
    if last is not None and last.get("input_sha256") == digest:
        log.info("repeated ids of this input were listed by an earlier run: reusing %s/", DUPLICATES)
        listing = last.get("listing", "")
    else:
        listing = f"{LISTING}{digest[:16]}"
        _remove_listings(fs, folder, keep=last.get("listing", "") if last else None)  # interrupted ones
        index = IdIndex(fs, join(folder, IDS))
        index.add(shards, config)
        record = read_run_record(fs, root)
        ranks = Ranks.since(fs, root, record, last) if config.duplicate_ids == "reject" else None
        repeats = index.repeats(shards, ranks)
        if repeats is not None:
            repeats.write_parquet(
                join(folder, listing), filesystem=PyFileSystem(FSSpecHandler(fs)), min_rows_per_file=100_000
            )
        failpoint("duplicates.before_done")
        found, no_longer, examples = _rows_written(fs, folder, listing)
        generation = len(record["generations"]) - 1 if record else None
        done = {"input_sha256": digest, "listing": listing, "generation": generation, "repeats": found}
        atomic_write(fs, join(folder, DONE), json.dumps(done | {"no_longer_repeats": no_longer}).encode())
        _remove_listings(fs, folder, keep=listing)  # the last one, now replaced
        log.info("%d rows repeat an earlier id; listed in %s/%s/", found, DUPLICATES, listing)
        if no_longer:
            log.warning(
                "%d rows were rejected as repeats of a row the input no longer has (its shard changed or was "
                "deleted), e.g. %s: each is its id's first occurrence now; one already dead-lettered stays so "
                "until its shard is embedded again (rewrite it and run with --refresh)",
                no_longer,
                ", ".join(examples),
            )
    return RepeatedRows(config.output, config.storage, listing) if config.duplicate_ids == "reject" else None


def _remove_listings(fs, folder: str, *, keep: str | None) -> None:
    """Every listing but keep: an interrupted one, or the one keep replaced. keep '' is the files
    straight in folder, a listing from before listings had folders (None: keep none of them). The
    kept ids and _done.json stay."""
    if not fs.exists(folder):
        return
    for path in fs.ls(folder, detail=False):
        name = name_of(path)
        if name.startswith("_") or name == keep:
            continue
        if name.startswith(LISTING):
            fs.rm(path, recursive=True)
        elif keep != "":
            remove_many(fs, [path])


@dataclass(frozen=True)
class Ranks:
    """For reject, when the input changed since the last listing: which occurrences of an id come
    first. KEPT: a row of a version the last listing saw and did not reject (its first, or an id's
    only row); NEW: a row of a version added or changed since; REJECTED_BEFORE: a row the last
    listing rejected, in a version still current. Rows the output holds keep their place: a new
    row that repeats an embedded id is rejected, not the embedded one."""

    new: pa.Array
    """The URLs (as the shard column holds them) whose current version came after the last listing."""
    last_listing: list[str]
    """The last listing's files."""

    @classmethod
    def since(cls, fs, root: str, record: dict | None, last: dict | None) -> Ranks | None:
        """None where there is no last listing to keep to (or it predates this order): then every
        row is in plain (shard, row) order, as on a first listing."""
        if record is None or last is None or last.get("generation") is None:
            return None
        later = {**record, "generations": [g for g in record["generations"] if g["generation"] > last["generation"]]}
        versions = current_versions(recorded_inputs(fs, root, later, INPUT_COLUMNS))
        return cls(url_texts(versions.column("url")), _listing_files(fs, join(root, DUPLICATES), last["listing"]))

    def rejected_before(self, fs) -> ray.data.Dataset | None:
        """The last listing's repeats in versions still current, as RANKED_SCHEMA rows of rank
        REJECTED_BEFORE: marks for the groupby, not occurrences of their own."""
        if not self.last_listing:
            return None
        rows = ray.data.read_parquet(self.last_listing, filesystem=PyFileSystem(FSSpecHandler(fs)))
        return rows.map_batches(_marks, batch_format="pyarrow", fn_kwargs={"new": self.new})


def _marks(batch: pa.Table, *, new: pa.Array) -> pa.Table:
    batch = batch.filter(pc.is_valid(batch.column("first_shard")))
    batch = batch.filter(pc.invert(pc.is_in(batch.column("shard"), value_set=new)))
    ranks = pa.array(np.full(batch.num_rows, REJECTED_BEFORE, np.int8))
    return batch.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA).append_column("rank", ranks)


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
        # Read from a file in the output, as the job reads: read tasks' copies of 10^6 shards took 270 MB.
        to_read = write_shards_to_read(todo_url(config.output, f"ids-{number:06d}"), config.storage, new)
        rows = ray.data.read_datasource(ShardDatasource(to_read, config.text_field, config.id_field, config.storage))
        # Materialized (in Ray's object store, spilled as it fills), so that the read runs in parallel
        # rather than fused into the write's few big files, and the groupby after reads it from there.
        ids = rows.map_batches(_ids_and_places, batch_format="pyarrow").materialize()
        to_read.remove()
        ids.write_parquet(path, filesystem=PyFileSystem(FSSpecHandler(self.fs)), min_rows_per_file=1_000_000)
        versions = new.table.select(["url", "fingerprint"])
        atomic_write(self.fs, f"{path}{PASS_SHARDS}", parquet_bytes(versions))
        self.passes[number] = versions
        self.fresh[number] = ids

    def repeats(self, shards: ShardListing, ranks: Ranks | None = None):
        """A dataset of every occurrence of a repeated id among these shards' versions except its
        first, with where the first one is (DUPLICATES_SCHEMA), computed on the cluster from the kept
        ids; first by ranks, then (shard, row); None when no pass holds an id."""
        current = _version_keys(shards.table)
        new = ranks.new if ranks else pa.array([], pa.string())
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
            superseded = url_texts(gone.column("url")) if gone.num_rows else pa.array([], pa.string())
            ids = ids.map_batches(_ranked, batch_format="pyarrow", fn_kwargs={"superseded": superseded, "new": new})
            datasets.append(ids)
        if not datasets:
            return None
        marks = ranks.rejected_before(self.fs) if ranks else None
        if marks is not None:
            datasets.append(marks)
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


def _ranked(batch: pa.Table, *, superseded: pa.Array, new: pa.Array) -> pa.Table:
    """A pass's ids of current versions, each with its rank: NEW in a shard whose version is newer than
    the last listing, else KEPT (REJECTED_BEFORE comes from the marks)."""
    batch = batch.filter(pc.invert(pc.is_in(batch.column("shard"), value_set=superseded)))
    is_new = pc.is_in(batch.column("shard"), value_set=new).to_numpy(zero_copy_only=False)
    return batch.append_column("rank", pa.array(np.where(is_new, NEW, KEPT).astype(np.int8)))


def _rows_written(fs, folder: str, listing: str) -> tuple[int, int, list[str]]:
    """The repeats a listing holds and its rows that are no longer repeats, counted from its files
    (counting the dataset would read the whole input again), and the first few of those ('id at shard
    row r'). Ray writes no file (and so, on disk, no folder) when there is no repeat."""
    files = _listing_files(fs, folder, listing)
    if not files:
        return 0, 0, []
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=DUPLICATES_SCHEMA)
    first_gone = pc.field("first_shard").is_null()
    no_longer = dataset.count_rows(filter=first_gone)
    examples = dataset.head(5, columns=["id", "shard", "row"], filter=first_gone).to_pylist() if no_longer else []
    return (
        dataset.count_rows() - no_longer,
        no_longer,
        [f"{r['id']!r} at {r['shard']} row {r['row']}" for r in examples],
    )


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
    """The rows of one id (RANKED_SCHEMA) after its first (the lowest rank, then the earliest shard
    and row), each with the first's place; the first too, with no place, where the last listing had
    rejected it (it is no longer a repeat)."""
    if group.num_rows < 2:  # one row, or one mark without its row (a shard deleted since)
        return DUPLICATES_SCHEMA.empty_table()
    is_mark = pc.equal(group.column("rank"), REJECTED_BEFORE)
    rows, marks = group.filter(pc.invert(is_mark)), group.filter(is_mark)
    if marks.num_rows:
        marked = pc.is_in(_places(rows), value_set=_places(marks)).to_numpy(zero_copy_only=False)
        ranks = np.where(marked, REJECTED_BEFORE, rows.column("rank").to_numpy()).astype(np.int8)
        rows = rows.set_column(rows.schema.get_field_index("rank"), "rank", pa.array(ranks))
    if not rows.num_rows:
        return DUPLICATES_SCHEMA.empty_table()
    ordered = rows.sort_by([("rank", "ascending"), ("shard", "ascending"), ("row", "ascending")])
    first_shard, first_row = ordered.column("shard")[0].as_py(), ordered.column("row")[0].as_py()
    no_longer_a_repeat = ordered.column("rank")[0].as_py() == REJECTED_BEFORE
    listed = ordered if no_longer_a_repeat else ordered.slice(1)
    places = [(first_shard, first_row)] * listed.num_rows
    if no_longer_a_repeat:
        places[0] = (None, None)
    return pa.table(
        {
            "id": listed.column("id"),
            "shard": listed.column("shard"),
            "row": listed.column("row"),
            "first_shard": pa.array([p[0] for p in places], pa.string()),
            "first_row": pa.array([p[1] for p in places], pa.int64()),
        },
        schema=DUPLICATES_SCHEMA,
    )


def _places(rows: pa.Table) -> pa.Array:
    """shard and row of each row as one key."""
    row = pc.cast(rows.column("row"), pa.string())
    return pc.binary_join_element_wise(rows.column("shard"), row, "\0").combine_chunks()
