"""Compaction: the output's many small records folded into one checkpoint file.

Every part has a commit record and every read task a read record; at 10^6 shards that would be
thousands of small objects to fetch on every start, status and verify. The holder of the writer
lease writes everything the state holds into _checkpoint/<seq>.parquet (one row per commit, per
shard read to its end, per shard failed part way), then deletes the records it folded in and the
older checkpoints, as table formats compact their logs.

The per-shard facts (shards read to their end, committed ranges) are rows of their own, sorted by URL
(sorted_facts.py), so that `status` and a run's start read them a batch at a time; a commit row holds
its record without its ranges. The next checkpoint merges the last one's facts, still in its file,
with the records' the same way, and is written a row group at a time: a compaction holds the records
and a batch, not the corpus. The lease holder compacts at a run's start and end and, while its job
runs, every minute (the job's parts in flight are staged, not yet named by any record). A
checkpoint written before this (its commits' ranges inside their records) is still read, whole.

Crash-safe at every step: readers take the newest checkpoint plus every record still there, and
the facts merge idempotently (a part by its name, a shard by its URL), so a record deleted late is
only read twice. The checkpoint is created only if its name is free, so two compactions that read
the same state cannot both write the next one. A checkpoint stays CHECKPOINT_GRACE_S after a newer
one replaced it, as table formats keep a snapshot until it expires: a `status` or `verify` that
reads it a batch at a time finishes on it, though a fold writes a new one every second or so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.faults import failpoint
from pipeline.io import sorted_facts
from pipeline.io.layout import (
    CHECKPOINTS,
    create_exclusive,
    join,
    listing,
    modified_s,
    name_of,
    remove_many,
    url_column,
    urls_of,
    with_every_column,
)
from pipeline.io.lease import check_lease, store_now
from pipeline.io.ledger import DONE_SCHEMA, RANGES_SCHEMA, PackedRanges, unique_done
from pipeline.io.manifest import CommitRecord, FileFailure, OutputState, records_in_batches
from pipeline.io.sorted_facts import SORTED_BY, in_step, is_sorted, sorted_by_url

log = logging.getLogger(__name__)

# Records (commit and read) read from their own files before a run's recovery compacts them, or the
# per-shard facts they hold: folded into the sorted checkpoint, those are read a batch at a time.
COMPACT_AFTER_RECORDS = 64
COMPACT_AFTER_FACTS = 10_000


# Per-shard facts of the records one compaction reads at a time: about 0.6 KB each at the peak of a
# fold (measured, benchmarks/RESULTS.md), so ~150 MB a batch, however many the records name. Each
# batch rewrites the checkpoint: 2x10^6 facts in records take 8 (6.8 s against 5.0 s folded at once).
FOLD_FACTS = 250_000


# How long a replaced checkpoint stays for the readers that started on it (by the store's clock).
CHECKPOINT_GRACE_S = 600.0


def worth_compacting(state: OutputState) -> bool:
    return len(state.records) >= COMPACT_AFTER_RECORDS or state.facts_in_records >= COMPACT_AFTER_FACTS


CHECKPOINT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # commit | failed | done | range
        ("url", pa.binary()),  # layout.url_column
        ("fingerprint", pa.string()),
        ("rows", pa.int64()),  # rows of a shard read to its end; rows read before a failure
        ("reason", pa.string()),
        ("message", pa.string()),
        ("commit", pa.binary()),  # the commit record (without its ranges where the file is sorted)
        ("part", pa.string()),  # a range's part
        ("generation", pa.int32()),  # a range's generation
        ("start", pa.int64()),  # a range's rows: [start, end)
        ("end", pa.int64()),
    ]
)
COMMIT, FAILED_READ, DONE, RANGE = "commit", "failed", "done", "range"


def read_checkpoint(fs: fsspec.AbstractFileSystem, root: str, state: OutputState, *, shard_facts: bool = True) -> None:
    """Add the newest checkpoint's facts to state (records already in it are merged, not doubled).
    shard_facts=False leaves a sorted checkpoint's done shards and ranges in the file, for
    shard_facts_in_batches; its commits' ranges are then empty."""
    for attempt in range(3):
        listed = listing(fs, join(root, CHECKPOINTS), ".parquet")
        paths = sorted(listed)
        if not paths:
            return
        try:
            with fs.open(paths[-1], "rb") as f:
                parquet = pq.ParquetFile(f)
                if shard_facts or not is_sorted(parquet.schema_arrow):
                    table = parquet.read()
                else:
                    table = _read_kinds(parquet, (COMMIT, FAILED_READ))
                    state.facts_in_checkpoint = True
        except FileNotFoundError:  # a newer compaction replaced it since the listing
            if attempt == 2:
                raise
            continue
        state.checkpoints, state.checkpoint_times = paths, listed
        # An older checkpoint lacks the range columns.
        _merge(state, with_every_column(table, CHECKPOINT_SCHEMA), facts_as_rows=is_sorted(table.schema))
        return


def _read_kinds(parquet: pq.ParquetFile, kinds: tuple[str, ...]) -> pa.Table:
    tables = list(_row_groups_of_kinds(parquet, kinds))
    return pa.concat_tables(tables) if tables else parquet.schema_arrow.empty_table()


def _row_groups_of_kinds(
    parquet: pq.ParquetFile, kinds: tuple[str, ...], columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The rows of these kinds a row group at a time, reading only the row groups whose statistics
    say they may hold them."""
    for group in range(parquet.num_row_groups):
        if _may_hold(parquet, group, kinds):
            yield _of_kinds(parquet.read_row_group(group, columns=columns), kinds)


def _may_hold(parquet: pq.ParquetFile, group: int, kinds: tuple[str, ...]) -> bool:
    column = parquet.metadata.row_group(group).column(parquet.schema_arrow.get_field_index("kind"))
    stats = column.statistics
    if stats is None or not stats.has_min_max:
        return True
    return any(stats.min <= kind <= stats.max for kind in kinds)


def _of_kinds(table: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    return table.filter(pc.is_in(table.column("kind"), pa.array(kinds)))


def _merge(state: OutputState, table: pa.Table, *, facts_as_rows: bool) -> None:
    kind = table.column("kind")
    named = state.record_parts
    ranges_by_part = _ranges_by_part(table.filter(pc.equal(kind, RANGE))) if facts_as_rows else {}
    for raw in table.filter(pc.equal(kind, COMMIT)).column("commit").to_pylist():
        commit = CommitRecord.from_json(raw)
        if commit.part not in named:
            if facts_as_rows:
                commit = dataclasses.replace(commit, ranges=ranges_by_part.get(commit.part, PackedRanges({})))
            state.commits.append(commit)
    state.done_chunks.append(table.filter(pc.equal(kind, DONE)).select(DONE_SCHEMA.names))
    failed = table.filter(pc.equal(kind, FAILED_READ))
    for url, row in zip(urls_of(failed.column("url")), failed.to_pylist(), strict=True):
        failure = FileFailure(url, row["fingerprint"], row["rows"], row["reason"], row["message"])
        state.file_failures.setdefault((url, failure.fingerprint), failure)


def _ranges_by_part(ranges: pa.Table) -> dict[str, PackedRanges]:
    """A sorted checkpoint's range rows as each commit's PackedRanges (one sort by part, then slices)."""
    ranges = ranges.take(pc.sort_indices(ranges, sort_keys=[("part", "ascending"), ("url", "ascending")]))
    parts = ranges.column("part").to_numpy(zero_copy_only=False)
    heads = [0, *(np.flatnonzero(parts[1:] != parts[:-1]) + 1).tolist(), len(parts)]
    return {
        parts[a]: PackedRanges.of_columns(ranges.slice(a, b - a).select(["url", "start", "end"]))
        for a, b in zip(heads, heads[1:], strict=False)
        if b > a
    }


def shard_facts_in_batches(fs: fsspec.AbstractFileSystem, state: OutputState, kind: str) -> Iterator[pa.Table]:
    """The done shards (DONE_SCHEMA) or committed ranges (RANGES_SCHEMA) that read_checkpoint left in a
    sorted checkpoint (shard_facts=False), in URL order, a row group at a time; nothing otherwise."""
    schema = DONE_SCHEMA if kind == DONE else RANGES_SCHEMA
    for table in _checkpointed_facts(fs, state, kind):
        yield table.select(schema.names)


RANGES_OF_PARTS = RANGES_SCHEMA.append(pa.field("part", pa.string()))


def ranges_in_batches(fs: fsspec.AbstractFileSystem, state: OutputState) -> list[Iterator[pa.Table]]:
    """Every committed range with its part (RANGES_OF_PARTS), from the checkpoint's file (a row group at
    a time) and from the records in state: two sources for sorted_facts.in_step, each in URL order."""
    return [_checkpointed_facts(fs, state, RANGE), iter([_recorded_ranges(state)])]


def _checkpointed_facts(fs: fsspec.AbstractFileSystem, state: OutputState, kind: str) -> Iterator[pa.Table]:
    """shard_facts_in_batches, ranges with their part (RANGES_OF_PARTS), of the commits the state holds
    from the checkpoint only: a commit repair withdrew has none, and one a record holds too has the
    record's."""
    if not state.facts_in_checkpoint:
        return
    schema = DONE_SCHEMA if kind == DONE else RANGES_OF_PARTS
    kept = pa.array(sorted({c.part for c in state.commits} - state.record_parts), pa.string())
    with fs.open(state.checkpoints[-1], "rb") as f:
        for table in _row_groups_of_kinds(pq.ParquetFile(f), (kind,), ["kind", *schema.names]):
            if kind == RANGE:
                table = table.filter(pc.is_in(table.column("part"), value_set=kept))
            yield table.select(schema.names).cast(schema)


def _recorded_ranges(state: OutputState) -> pa.Table:
    """The ranges of the commits the state holds in memory (RANGES_OF_PARTS), sorted by URL."""
    tables = []
    for commit in state.commits:
        ranges = commit.ranges_table()
        tables.append(ranges.append_column("part", pa.repeat(pa.scalar(commit.part), ranges.num_rows)))
    return sorted_by_url(pa.concat_tables(tables).cast(RANGES_OF_PARTS)) if tables else RANGES_OF_PARTS.empty_table()


def write_checkpoint(fs: fsspec.AbstractFileSystem, state: OutputState, sink) -> None:
    """Everything the state says is committed or read, one row per fact, as a sorted checkpoint into
    sink (a file object): the done shards, then the ranges, each sorted by URL, then the commits and
    the failures. Facts still in the last checkpoint (read_state(shard_facts=False)) are merged with
    the records' a batch of URLs at a time, so memory holds the records and a batch, not the corpus."""
    failed_urls = url_column(sorted({url for url, _ in state.file_failures}))
    read_since_failing: set[tuple[str, str]] = set()
    with _RowGroups(sink) as out:
        sources = [_checkpointed_facts(fs, state, DONE), [sorted_by_url(state.done)]]
        for step in in_step(sources, [DONE_SCHEMA.empty_table()] * 2):
            done = sorted_by_url(unique_done(step))
            out.write(done.append_column("kind", pa.repeat(DONE, done.num_rows)))
            if len(failed_urls):
                again = done.filter(pc.is_in(done.column("url"), value_set=failed_urls))
                keys = zip(urls_of(again.column("url")), again.column("fingerprint").to_pylist(), strict=True)
                read_since_failing |= set(keys)
        out.end_group()
        for step in in_step(ranges_in_batches(fs, state), [RANGES_OF_PARTS.empty_table()] * 2):
            ranges = sorted_by_url(pa.concat_tables(step))
            out.write(ranges.append_column("kind", pa.repeat(RANGE, ranges.num_rows)))
        out.end_group()
        failed = [f for key, f in sorted(state.file_failures.items()) if key not in read_since_failing]
        out.write(
            pa.table(
                {
                    "kind": [COMMIT] * len(state.commits) + [FAILED_READ] * len(failed),
                    "url": url_column([None] * len(state.commits) + [f.url for f in failed]),
                    "fingerprint": [None] * len(state.commits) + [f.fingerprint for f in failed],
                    "rows": [c.rows for c in state.commits] + [f.rows_read for f in failed],
                    "reason": [None] * len(state.commits) + [f.reason for f in failed],
                    "message": [None] * len(state.commits) + [f.message for f in failed],
                    "commit": [c.to_json(with_ranges=False) for c in state.commits] + [None] * len(failed),
                }
            )
        )


class _RowGroups:
    """Rows written to a sorted checkpoint in row groups of sorted_facts.BATCH_ROWS, whatever the sizes
    of the tables they come in; end_group() ends one early, so that a group holds one kind of fact."""

    def __init__(self, sink) -> None:
        self.writer = pq.ParquetWriter(sink, CHECKPOINT_SCHEMA.with_metadata(SORTED_BY), compression="zstd")
        self.pending: list[pa.Table] = []

    def __enter__(self) -> _RowGroups:
        return self

    def __exit__(self, *exc) -> None:
        self.end_group()
        self.writer.close()

    def write(self, table: pa.Table) -> None:
        self.pending.append(with_every_column(table, CHECKPOINT_SCHEMA))  # each kind of fact has only its own
        while sum(t.num_rows for t in self.pending) >= sorted_facts.BATCH_ROWS:
            rows = pa.concat_tables(self.pending)
            self.writer.write_table(rows.slice(0, sorted_facts.BATCH_ROWS))
            self.pending = [rows.slice(sorted_facts.BATCH_ROWS)]

    def end_group(self) -> None:
        rows = pa.concat_tables(self.pending) if self.pending else None
        if rows is not None and rows.num_rows:
            self.writer.write_table(rows)
        self.pending = []


def fold_records(fs: fsspec.AbstractFileSystem, root: str, lease_token: int) -> int:
    """Compact the records there a batch of about FOLD_FACTS per-shard facts at a time, while they are
    worth it: a run whose records name a million shards (committed in its last minute, or left by a
    crash) is folded into the checkpoint without its driver ever holding them all. Only by the lease
    holder (lease_token). Staging is not read: a checkpoint may name a part still staged, which
    recovery publishes (as after a compaction while running). A lost writer's commits are left to
    recovery. Returns the number of checkpoints written."""
    written = 0
    for batch in records_in_batches(fs, root, FOLD_FACTS):
        if batch.facts_in_records < FOLD_FACTS and not worth_compacting(batch):  # the last few records
            break
        read_checkpoint(fs, root, batch, shard_facts=False)
        if not compact(fs, root, batch, lease_token, running=True):
            break
        written += 1
    return written


def compact(
    fs: fsspec.AbstractFileSystem, root: str, state: OutputState, lease_token: int, *, running: bool = False
) -> bool:
    """Write the state as the next checkpoint and delete what it replaces; only by the lease holder
    (lease_token), on a state that recovery has brought in line, or (running) one its own running
    job is writing: its staged files are parts in flight, which no checkpoint names. False if another
    compaction won."""
    if state.fenced or (not running and (state.staged or state.leftovers)):
        raise ValueError("compact() needs a recovered state")
    check_lease(fs, root, lease_token)
    last = int(name_of(state.checkpoints[-1]).split(".")[0]) if state.checkpoints else 0
    path = join(root, CHECKPOINTS, f"{last + 1:010d}.parquet")
    sink = pa.BufferOutputStream()  # compressed: some bytes per shard
    write_checkpoint(fs, state, sink)
    checkpoint = sink.getvalue().to_pybytes()
    del sink
    # Arrow's allocator keeps what the merge freed for the process; a long run compacts again and
    # again beside Ray's own work, so it goes back (measured: 40 MB per 10^5 shard facts).
    pa.default_memory_pool().release_unused()
    try:
        create_exclusive(fs, path, checkpoint)
    except FileExistsError:
        log.warning("another compaction of %s wrote %s first; leaving the records as they are", root, path)
        return False
    failpoint("compact.after_checkpoint")
    remove_many(fs, state.records)
    failpoint("compact.after_records")
    fs.invalidate_cache(join(root, CHECKPOINTS))  # the listing above cached the folder without it
    written = modified_s(fs.info(path))
    log.info("compacted %d records into %s", len(state.records), path)
    state.records = []
    state.checkpoints.append(path)
    state.checkpoint_times[path] = written
    _remove_expired(fs, state, written)
    return True


def expire_checkpoints(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> None:
    """Delete the checkpoints replaced CHECKPOINT_GRACE_S ago or more. A compaction does as it writes
    a new one; an output that is not compacted again gets here at its next run's recovery."""
    if len(state.checkpoints) > 1:
        _remove_expired(fs, state, store_now(fs, root))


def _remove_expired(fs: fsspec.AbstractFileSystem, state: OutputState, now: float) -> None:
    """Delete the checkpoints whose successor was written CHECKPOINT_GRACE_S or more before now, by
    the store's clock (no reader that started on them is left), and forget them in state."""
    times = state.checkpoint_times
    successors = zip(state.checkpoints, state.checkpoints[1:], strict=False)
    expired = [old for old, newer in successors if now - times.get(newer, now) >= CHECKPOINT_GRACE_S]
    remove_many(fs, expired)
    state.checkpoints = [p for p in state.checkpoints if p not in expired]
    state.checkpoint_times = {p: t for p, t in times.items() if p not in expired}
