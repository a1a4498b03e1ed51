"""The input's generations: which version of every shard the output holds, and what a run has to do.

Each generation is a file, _inputs/<generation>.parquet, of the shards it added, changed (their new
fingerprint: re-embedded whole) or deleted, and an entry in the run record with its counts. A
shard's *current* version is its entry in the latest generation that names it; a deleted one has
none. Every committed part belongs to one generation, so a row is current exactly when its (shard,
generation) is a current shard's: the current view (current.py) needs no rewrite of old parts.

A run first finishes every generation that has work left (a crashed run's, or a refresh killed half
way), oldest first; only then does it add a generation for what changed in the listing: new shards
always, changed and deleted ones with --refresh (without it, a changed shard is refused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import sorted_facts
from pipeline.io.compaction import DONE, RANGES_OF_PARTS, ranges_in_batches, shard_facts_in_batches
from pipeline.io.layout import INPUTS, atomic_write, join, parquet_bytes, url_column, url_text, url_texts, urls_of
from pipeline.io.ledger import (
    DONE_SCHEMA,
    INPUT_COLUMNS,
    RANGES_SCHEMA,
    among,
    committed,
    current_versions,
    ledger,
    positions,
    recorded_versions,
    unique_done,
)
from pipeline.io.manifest import FileFailure, OutputState
from pipeline.io.ranges import Range, merge_ranges
from pipeline.io.shards import ShardListing
from pipeline.io.sorted_facts import file_batches, in_step, sorted_by_url

log = logging.getLogger(__name__)

ADDED, CHANGED, DELETED = "added", "changed", "deleted"
INPUTS_SCHEMA = pa.schema(
    [
        ("url", pa.binary()),  # layout.url_column: exact, even for a file name that is not UTF-8
        ("shard", pa.string()),  # the URL as text, as parts/ and errors/ hold it in their shard column
        ("format", pa.string()),
        ("size_bytes", pa.int64()),
        ("fingerprint", pa.string()),
        ("generation", pa.int32()),
        ("change", pa.string()),  # added | changed | deleted
    ]
)


@dataclass(frozen=True)
class Changes:
    added: ShardListing  # sorted by URL, as the listing they are taken from (add_generation relies on it)
    changed: ShardListing
    deleted: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.deleted)

    def counts(self) -> dict[str, int]:
        return {ADDED: len(self.added), CHANGED: len(self.changed), DELETED: len(self.deleted)}


def recorded_inputs(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, columns: list[str] | None = None
) -> pa.Table:
    """Every generation's entries (INPUTS_SCHEMA, or these of its columns), generation after
    generation, each in URL order."""
    columns = INPUTS_SCHEMA.names if columns is None else columns
    tables = [table for batches in _entries_in_batches(fs, root, record, columns) for table in batches]
    return pa.concat_tables(tables) if tables else pa.schema([INPUTS_SCHEMA.field(c) for c in columns]).empty_table()


def _entries_in_batches(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, columns: list[str]
) -> list[Iterable[pa.Table]]:
    """Each generation's entries (these columns of INPUTS_SCHEMA) in URL order, a batch at a time:
    from _inputs/ or, in a version 1 record, from the record itself."""
    generations = []
    for generation in record["generations"]:
        if "inputs" in generation:  # manifest version 1: every shard added, none changed
            entries = inputs_table(generation["inputs"], generation["generation"]).select(columns)
            generations.append([sorted_by_url(entries)])
        else:
            generations.append(file_batches(fs, join(root, generation["inputs_file"]), columns, INPUTS_SCHEMA))
    return generations


@dataclass(frozen=True)
class LedgerStep:
    """What the output knows of one interval of URLs (a step of sorted_facts.in_step)."""

    shards: pa.Table
    """The ledger (ledger.ledger) of the current versions."""
    recorded: pa.Table
    """Every version any generation recorded (ledger.recorded_versions), deleted ones left out."""
    ranges: pa.Table
    """Every committed range, with its part (compaction.RANGES_OF_PARTS)."""
    committed: pa.Table
    """Those ranges per version (ledger.committed)."""
    more: list[pa.Table]
    """The rows of each of the extra sources (ledger_steps' more)."""


def ledger_in_batches(fs: fsspec.AbstractFileSystem, root: str, record: dict, state: OutputState) -> Iterator[pa.Table]:
    """The shard ledger (ledger.ledger) of the current versions, a batch of URLs at a time (in_step): every
    generation's entries, done shards and committed ranges, read in URL order from _inputs/ and the
    checkpoint (state read with shard_facts=False) together with the records' facts in state."""
    for step in ledger_steps(fs, root, record, state):
        yield step.shards


def ledger_steps(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, state: OutputState, more: tuple[pa.Table, ...] = ()
) -> Iterator[LedgerStep]:
    """ledger_in_batches, step by step with all the step's facts and its rows of each table in more
    (tables sorted by url)."""
    inputs_schema = pa.schema([INPUTS_SCHEMA.field(c) for c in INPUT_COLUMNS])
    generations = _entries_in_batches(fs, root, record, INPUT_COLUMNS)
    sources = [
        *generations,
        shard_facts_in_batches(fs, state, DONE),
        [sorted_by_url(state.done)],
        *ranges_in_batches(fs, state),
        # A batch at a time, so that a step holds a batch of each, not all of a source no other one bounds.
        *((pa.Table.from_batches([batch]) for batch in table.to_batches(sorted_facts.BATCH_ROWS)) for table in more),
    ]
    empty = [inputs_schema.empty_table()] * len(generations) + [DONE_SCHEMA.empty_table()] * 2
    empty += [RANGES_OF_PARTS.empty_table()] * 2 + [table.schema.empty_table() for table in more]
    n = len(generations)
    for step in in_step(sources, empty):
        entries = pa.concat_tables([inputs_schema.empty_table(), *step[:n]])  # generation order
        checkpoint_done, records_done, checkpoint_ranges, records_ranges = step[n : n + 4]
        ranges = pa.concat_tables([checkpoint_ranges, records_ranges])
        per_version = committed(ranges)
        yield LedgerStep(
            shards=ledger(current_versions(entries), unique_done([checkpoint_done, records_done]), per_version),
            recorded=recorded_versions(entries),
            ranges=ranges,
            committed=per_version,
            more=step[n + 4 :],
        )


def shard_counts(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, state: OutputState
) -> tuple[dict[str, int], list[FileFailure]]:
    """Current shards, how many are complete and read to their end, and their rows, counted a batch of
    URLs at a time (ledger_in_batches): memory does not grow with the corpus. And the failed reads of
    current versions that no read finished (OutputState.failed_part_way, without reading every done
    shard at once)."""
    counts = dict.fromkeys(("shards", "complete", "read", "rows_read"), 0)
    failed = FailedReads(state)
    for shards in ledger_in_batches(fs, root, record, state):
        read_rows = shards.column("rows")
        counts["shards"] += shards.num_rows
        counts["complete"] += pc.sum(shards.column("complete")).as_py() or 0
        counts["read"] += read_rows.length() - read_rows.null_count
        counts["rows_read"] += pc.sum(read_rows).as_py() or 0
        failed.add(shards)
    return counts, failed.of_current_versions()


class FailedReads:
    """The state's failed reads of current versions that no read finished, found a batch of the
    shard ledger at a time."""

    def __init__(self, state: OutputState) -> None:
        self.failures = state.file_failures
        self.urls = url_column(sorted({url for url, _ in state.file_failures}))
        self.unfinished: set[tuple[str, str]] = set()

    def add(self, shards: pa.Table) -> None:
        if len(self.urls):
            mine = shards.filter(pc.is_in(shards.column("url"), value_set=self.urls))
            mine = mine.filter(pc.is_null(mine.column("rows")))
            keys = zip(urls_of(mine.column("url")), mine.column("fingerprint").to_pylist(), strict=True)
            self.unfinished |= set(keys)

    def of_current_versions(self) -> list[FileFailure]:
        return [f for key, f in sorted(self.failures.items()) if key in self.unfinished]


@dataclass(frozen=True)
class RunPlan:
    """What a run has to do: the listing against what the output holds."""

    changes: Changes
    """What the listing adds to, changes in and removes from the current input."""
    unfinished: dict[int, ShardListing]
    """Generation -> its current shards not yet complete, where the listing still shows that version
    (one that changed or vanished since is left to the next generation); oldest generation first."""
    committed: dict[int, dict[str, list[Range]]]
    """Of those shards: generation -> URL -> the row ranges already committed."""
    failed: list[FileFailure]
    """Failed reads of current versions that no read finished, as shard_counts finds them."""


def plan_run(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, state: OutputState, listed: ShardListing
) -> RunPlan:
    """The listing against the current versions and what the output holds of them, a batch of URLs at
    a time (ledger_steps): only the shards to do come back as Python objects, none on a finished
    re-run. state: read with shard_facts=False, or whole; listed: sorted by URL, as discover_shards
    lists."""
    listing = listed.table.select(["url", "fingerprint"])
    listing = listing.append_column("index", pa.array(np.arange(len(listed), dtype=np.int64)))
    added, changed, deleted, todo, ranges = [], [], [], [], []
    failed = FailedReads(state)
    for step in ledger_steps(fs, root, record, state, (listing,)):
        shards, step_ranges, (here,) = step.shards, step.ranges, step.more
        failed.add(shards)
        at = positions(here.column("url"), shards.column("url"))
        known = at >= 0
        index = here.column("index").to_numpy()
        same = np.zeros(len(at), dtype=bool)  # listed with the fingerprint of its current version
        theirs = shards.column("fingerprint").take(pa.array(at[known]))
        listed_prints = here.column("fingerprint").filter(pa.array(known))
        same[known] = pc.equal(listed_prints, theirs).to_numpy(zero_copy_only=False)
        added.append(index[~known])
        changed.append(index[known & ~same])
        still_listed = np.zeros(shards.num_rows, dtype=bool)
        still_listed[at[known]] = True
        deleted.extend(urls_of(shards.column("url").filter(pa.array(~still_listed))))
        incomplete = ~shards.column("complete").to_numpy(zero_copy_only=False)
        to_do = same.copy()
        to_do[same] = incomplete[at[same]]
        versions = shards.take(pa.array(at[to_do]))
        todo.append(np.stack([index[to_do], versions.column("generation").to_numpy().astype(np.int64)]))
        ranges.append(step_ranges.filter(pa.array(among(step_ranges, versions))))
    todo_table = np.concatenate(todo, axis=1) if todo else np.zeros((2, 0), np.int64)
    return RunPlan(
        Changes(
            added=_subset(listed, added),
            changed=_subset(listed, changed),
            deleted=sorted(deleted),
        ),
        unfinished=_by_generation(listed, todo_table),
        committed=_ranges_by_generation(pa.concat_tables(ranges) if ranges else RANGES_SCHEMA.empty_table()),
        failed=failed.of_current_versions(),
    )


def _by_generation(listed: ShardListing, todo: np.ndarray) -> dict[int, ShardListing]:
    """todo: columns of (listing index, generation) -> generation -> shards, in listing order."""
    return {generation: _subset(listed, [todo[0][todo[1] == generation]]) for generation in np.unique(todo[1]).tolist()}


def _subset(listed: ShardListing, indices: list[np.ndarray]) -> ShardListing:
    """The listed shards at these positions (each one once), in listing order: the listing itself when
    that is all of it, as on a first run, rather than a copy."""
    chosen = np.sort(np.concatenate(indices)) if indices else np.zeros(0, np.int64)
    return listed if len(chosen) == len(listed) else listed.take(chosen)


def _ranges_by_generation(ranges: pa.Table) -> dict[int, dict[str, list[Range]]]:
    """Committed ranges (RANGES_SCHEMA) as generation -> URL -> merged ranges."""
    by_generation: dict[int, dict[str, list[Range]]] = {}
    columns = (urls_of(ranges.column("url")), *(ranges.column(c).to_pylist() for c in ("generation", "start", "end")))
    for url, generation, start, end in zip(*columns, strict=True):
        by_generation.setdefault(generation, {}).setdefault(url, []).append((start, end))
    return {g: {url: merge_ranges(rs) for url, rs in shards.items()} for g, shards in by_generation.items()}


def changes_since(versions: pa.Table, listing: ShardListing) -> Changes:
    """What the listing adds to, changes in and removes from the current input (versions), the whole
    listing at once (plan_run does it a batch at a time)."""
    at = positions(listing.table.column("url"), versions.column("url"))
    known = at >= 0
    theirs = versions.column("fingerprint").take(pa.array(at[known]))
    listed_prints = listing.table.column("fingerprint").filter(pa.array(known))
    rewritten = np.zeros(len(listing), dtype=bool)
    rewritten[known] = pc.not_equal(listed_prints, theirs).to_numpy(zero_copy_only=False)
    still_listed = np.zeros(versions.num_rows, dtype=bool)
    still_listed[at[known]] = True
    gone = versions.column("url").filter(pa.array(~still_listed))
    return Changes(
        added=listing.take(np.flatnonzero(~known)),
        changed=listing.take(np.flatnonzero(rewritten)),
        deleted=sorted(urls_of(gone)),
    )


def add_generation(
    fs: fsspec.AbstractFileSystem, root: str, record: dict, input_url: str, changes: Changes, *, refresh: bool
) -> int:
    """Record a new generation: its entries' file first, then the run record naming it (a crash between
    leaves a file the next run writes again). Returns its number."""
    from pipeline.io.run_record import save_run_record

    number = len(record["generations"])
    inputs_file = f"{INPUTS}/{number:06d}.parquet"
    atomic_write(fs, join(root, inputs_file), _entries_file(changes, number))
    record["generations"].append(
        {
            "generation": number,
            "input": input_url,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "refresh": refresh,
            "shards": len(changes.added) + len(changes.changed),
            "bytes": changes.added.size_bytes + changes.changed.size_bytes,
            **{f"shards_{kind}": n for kind, n in changes.counts().items()},
            "inputs_file": inputs_file,
        }
    )
    save_run_record(fs, root, record)
    return number


def _entries_file(changes: Changes, generation: int) -> bytes:
    """The generation's entries (INPUTS_SCHEMA) as a Parquet file sorted by URL, written a batch of URLs
    at a time: added, changed (each sorted, as subsets of the listing) and deleted merged in step, so
    that a million-shard first run never holds its entries whole."""
    deleted = url_column(changes.deleted)
    sources = [
        _entry_batches(changes.added, ADDED, generation),
        _entry_batches(changes.changed, CHANGED, generation),
        [
            sorted_by_url(  # as bytes: a name that is not UTF-8 sorts apart from Python's order
                pa.table(
                    {
                        "url": deleted,
                        "shard": url_texts(deleted),
                        "generation": pa.repeat(pa.scalar(generation, pa.int32()), len(deleted)),
                        "change": pa.repeat(pa.scalar(DELETED), len(deleted)),
                    }
                )
            )
        ],
    ]
    schema = INPUTS_SCHEMA.with_metadata(sorted_facts.SORTED_BY)  # read back a batch at a time (file_batches)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for step in in_step(sources, [INPUTS_SCHEMA.empty_table()] * len(sources)):
            entries = pa.concat_tables(step, promote_options="default").select(INPUTS_SCHEMA.names)
            writer.write_table(sorted_by_url(entries.cast(INPUTS_SCHEMA)).cast(schema), sorted_facts.BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def _entry_batches(shards: ShardListing, change: str, generation: int) -> Iterator[pa.Table]:
    """These shards, sorted by URL, as entries (INPUTS_SCHEMA columns) of a generation, a batch at a time."""
    for batch in shards.table.to_batches(max_chunksize=sorted_facts.BATCH_ROWS):
        yield pa.table(
            {
                "url": batch.column("url"),
                "shard": url_texts(batch.column("url")),
                "format": batch.column("format"),
                "size_bytes": batch.column("size_bytes"),
                "fingerprint": batch.column("fingerprint"),
                "generation": pa.repeat(pa.scalar(generation, pa.int32()), batch.num_rows),
                "change": pa.repeat(pa.scalar(change), batch.num_rows),
            }
        )


def upgrade_inputs(fs: fsspec.AbstractFileSystem, root: str, record: dict) -> None:
    """A version 1 record's inline shard lists, moved to _inputs/ (the record is saved by the caller)."""
    for generation in record["generations"]:
        if "inputs" in generation:
            inputs = generation.pop("inputs")
            generation["inputs_file"] = f"{INPUTS}/{generation['generation']:06d}.parquet"
            generation["shards"] = generation["shards_added"] = len(inputs)
            table = sorted_by_url(inputs_table(inputs, generation["generation"]))
            atomic_write(fs, join(root, generation["inputs_file"]), parquet_bytes(table, sorted_facts.BATCH_ROWS))


def inputs_table(inputs: list[dict], generation: int) -> pa.Table:
    """Shards a version 1 record listed inline, as added entries of INPUTS_SCHEMA."""
    columns = {
        "url": url_column([i["url"] for i in inputs]),
        "shard": [url_text(i["url"]) for i in inputs],
        "format": [i.get("format") for i in inputs],
        "size_bytes": [i.get("size_bytes") for i in inputs],
        "fingerprint": [i["fingerprint"] for i in inputs],
        "generation": pa.array([generation] * len(inputs), pa.int32()),
        "change": [ADDED] * len(inputs),
    }
    return pa.table(columns, schema=INPUTS_SCHEMA)


def generation_rows(state: OutputState) -> dict[int, int]:
    """Committed rows (embedded and dead-lettered) by generation."""
    rows: dict[int, int] = {}
    for commit in state.commits:
        rows[commit.generation] = rows.get(commit.generation, 0) + commit.rows
    return rows
