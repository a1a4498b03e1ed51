"""Bring an output back to exactly what its commit records say: after a crash (recover), and after
damage (repair). Nothing is deleted that a commit record names; what is taken out goes to
_quarantine/, where nothing reads it, so a mistake is never a loss.

recover() runs at the start and the end of every run, by the holder of the writer lease:
  - committed parts still in _staging are published; uncommitted ones are deleted;
  - commit records of a run that had lost the lease (manifest: fenced) go to quarantine with their
    files, so those rows are embedded again by the lease holder, once;
  - files under parts/ or errors/ that no commit record names (an interrupted --overwrite, a copy, a
    deleted record) go to quarantine.
The lease holder also compacts the commit and read records into a checkpoint (compaction.py).
repair() also checks that every committed part is there, readable, and holds exactly the rows its
record names; a part that does not is quarantined with its record, so a re-run embeds its rows again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.compaction import compact, expire_checkpoints, fold_records, worth_compacting
from pipeline.io.layout import (
    COMMITS,
    ERRORS,
    PARTS,
    QUARANTINE,
    STAGING,
    VACUUM,
    exists_now,
    join,
    move,
    remove_many,
)
from pipeline.io.manifest import CommitRecord, OutputState, read_state
from pipeline.io.ranges import rows_to_ranges

log = logging.getLogger(__name__)


class UnreadablePartError(Exception):
    """A published part cannot be read as Parquet."""


@dataclass
class RepairReport:
    """What repair changed, one line each, and the output's state after it."""

    actions: list[str] = field(default_factory=list)
    state: OutputState = field(default_factory=OutputState)


def recover(fs: fsspec.AbstractFileSystem, root: str, lease_token: int = 0, *, shard_facts: bool = True) -> OutputState:
    """Finish what a crashed run left; set aside what no commit record may stand for. The holder of
    the writer lease (lease_token) also compacts the records once there are many. shard_facts=False:
    the state leaves the checkpoint's per-shard facts in its file (read_state)."""
    # Records of a whole run or more are folded a batch at a time first.
    folded = fold_records(fs, root, lease_token) if lease_token else 0
    state = read_state(fs, root, shard_facts=shard_facts)
    _recover(fs, root, state)
    compacted = bool(lease_token) and worth_compacting(state) and compact(fs, root, state, lease_token)
    if compacted and not shard_facts:
        state = read_state(fs, root, shard_facts=False)  # the records' facts, now in the checkpoint's file
    if lease_token and not (folded or compacted):  # a compaction expires them as it writes (no clock probe)
        expire_checkpoints(fs, root, state)
    return state


def compact_while_running(fs: fsspec.AbstractFileSystem, root: str, lease_token: int) -> bool:
    """Fold the records a running job (the lease holder) has written so far into a checkpoint, once
    they are worth it (compaction.worth_compacting), a batch at a time (compaction.fold_records): so
    that `status` and a crash's recovery read a batch at a time what a long run committed, not every
    record whole. Records of a writer that lost the lease are left to recovery. True if it compacted."""
    return fold_records(fs, root, lease_token) > 0


def _recover(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> list[str]:
    """recover() on a state already read, brought up to date as it goes; what it set aside, a line each."""
    set_aside = [f"quarantined part {c.part}: committed after its run lost the lease" for c in state.fenced]
    for commit in state.fenced:
        _quarantine_commit(fs, root, state, commit, "it was committed after its run had lost the writer lease")
    state.fenced = []
    uncommitted = state.uncommitted()
    for commit in state.commits:
        for staged, target in state.unpublished(commit):
            if staged in state.staged:
                if _move_if_there(fs, join(root, STAGING, staged), join(root, target)):
                    log.info("published %s, committed by an interrupted run", target)
                state.published.add(target)
                state.staged.discard(staged)
    for path in [join(root, STAGING, name) for name in uncommitted] + state.leftovers:
        _remove_if_there(fs, path)
    if uncommitted or state.leftovers:
        log.info("removed %d uncommitted files left by an interrupted run", len(uncommitted) + len(state.leftovers))
    state.staged, state.leftovers = set(), []
    finish_vacuum(fs, root, state)
    for target in state.orphans():
        part = target.rsplit("/", 1)[-1].removesuffix(".parquet")
        if exists_now(fs, join(root, COMMITS, f"{part}.json")):  # committed since the listing: not an orphan
            continue
        _move_aside(fs, root, target)
        state.published.discard(target)
        set_aside.append(f"quarantined {target}: no commit record names it")
        log.warning(
            "%s has no commit record: moved to %s/ (its rows are embedded again if missing)", target, QUARANTINE
        )
    return set_aside


def finish_vacuum(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> None:
    """Delete the files of parts an interrupted vacuum had withdrawn, then its note of them; a note
    whose parts are all still committed waits for vacuum to be run again."""
    if not state.vacuuming:
        return
    leftovers = state.vacuum_leftovers()
    remove_many(fs, [join(root, target) for target in leftovers])
    state.published -= set(leftovers)
    if not state.vacuuming & {c.part for c in state.commits}:
        remove_many(fs, [join(root, VACUUM)])
        state.vacuuming = set()
    if leftovers:
        log.info("deleted %d files an interrupted vacuum had left", len(leftovers))


def repair(fs: fsspec.AbstractFileSystem, root: str, *, chunks: bool, lease_token: int = 0) -> RepairReport:
    """recover(), then withdraw every commit whose part is missing, unreadable or holds other rows.

    A withdrawn commit may live in the checkpoint: the lease holder (lease_token) writes a new one
    without it, the last step, so a crash before it leaves the commit there for the next repair.
    """
    state = read_state(fs, root)
    report = RepairReport(actions=_recover(fs, root, state), state=state)
    for commit in list(state.commits):
        missing = [target for _, target in commit.files() if target not in state.published]
        if missing:
            reason = f"its file {missing[0]} is missing"
        else:
            try:
                tables, _ = load_part(fs, root, commit, ["shard", "row", "chunk"])
                reason = part_mismatch(commit, tables, chunks=chunks)
            except UnreadablePartError as err:
                reason = str(err)
        if reason:
            _quarantine_commit(fs, root, state, commit, reason)
            report.actions.append(f"withdrew part {commit.part} ({commit.rows:,} rows are embedded again): {reason}")
    if lease_token and (report.actions or worth_compacting(state)):
        compact(fs, root, state, lease_token)
    return report


def load_part(
    fs: fsspec.AbstractFileSystem, root: str, commit: CommitRecord, columns: list[str] | None = None
) -> tuple[dict[str, pa.Table], dict[str, pa.Schema]]:
    """The part's published tables (those columns) and whole schemas by folder (parts, errors);
    UnreadablePartError if a file cannot be read."""
    tables, schemas = {}, {}
    for _, target in commit.files():
        folder = target.split("/", 1)[0]
        try:
            with fs.open(join(root, target), "rb") as f:
                parquet = pq.ParquetFile(f)
                schemas[folder] = parquet.schema_arrow
                wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                tables[folder] = parquet.read(columns=wanted)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise UnreadablePartError(f"{target} cannot be read ({type(err).__name__}: {err})") from err
    return tables, schemas


def part_mismatch(commit: CommitRecord, tables: dict[str, pa.Table], *, chunks: bool) -> str | None:
    """Why the part's tables do not hold exactly the rows its record names, or None when they do."""
    embedded = tables.get(PARTS)
    if chunks and embedded is not None:
        embedded = embedded.filter(pc.equal(embedded.column("chunk"), 0))  # one row per document
    both = [t.select(["shard", "row"]) for t in (embedded, tables.get(ERRORS)) if t is not None]
    rows = pa.concat_tables(both) if both else pa.table({"shard": pa.array([], pa.string()), "row": []})
    embedded_rows = embedded.num_rows if embedded is not None else 0
    if rows.num_rows != commit.rows or embedded_rows != commit.embedded_rows or ranges_of(rows) != commit.ranges:
        return f"part {commit.part} does not hold the rows its commit record names"
    return None


def ranges_of(table: pa.Table) -> dict[str, list[tuple[int, int]]]:
    """Which (shard, rows) a table holds, as merged row ranges per shard URL.

    One grouping pass: a part of many small shards must not cost a filter of the whole part per shard.
    """
    if table.num_rows == 0:
        return {}
    grouped = table.select(["shard", "row"]).group_by("shard", use_threads=False).aggregate([("row", "list")])
    return {
        url: rows_to_ranges(rows.values.to_numpy())
        for url, rows in zip(
            grouped.column("shard").to_pylist(), grouped.column("row_list").combine_chunks(), strict=True
        )
    }


def _quarantine_commit(
    fs: fsspec.AbstractFileSystem, root: str, state: OutputState, commit: CommitRecord, why: str
) -> None:
    """Take a part and its commit record out of the output: the record last, so that a crash midway
    leaves a record whose part is missing, which the next repair withdraws."""
    for staged, target in commit.files():
        if target in state.published:
            _move_aside(fs, root, target)
            state.published.discard(target)
        elif staged in state.staged:
            _move_aside(fs, root, f"{STAGING}/{staged}")
            state.staged.discard(staged)
    _move_aside(fs, root, f"{COMMITS}/{commit.part}.json")
    if commit in state.commits:
        state.commits.remove(commit)
    record = join(root, COMMITS, f"{commit.part}.json")
    if record in state.records:  # no longer there for a compaction to delete
        state.records.remove(record)
    log.warning("part %s moved to %s/: %s; its %d rows are embedded again", commit.part, QUARANTINE, why, commit.rows)


def _move_aside(fs: fsspec.AbstractFileSystem, root: str, relative: str) -> None:
    _move_if_there(fs, join(root, relative), join(root, QUARANTINE, relative))


# A writer's own publishing may race with a recovery that runs beside it (only the lease holder's
# recovery should, but a file that is already where it goes is no error).
def _move_if_there(fs: fsspec.AbstractFileSystem, source: str, target: str) -> bool:
    try:
        move(fs, source, target)
        return True
    except FileNotFoundError:
        return False


def _remove_if_there(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
