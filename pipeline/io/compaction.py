"""Compaction: the output's many small records folded into one checkpoint file.

Every part has a commit record and every read task a read record; at 10^6 shards that would be
thousands of small objects to fetch on every start, status and verify. The holder of the writer
lease writes everything the state holds into _checkpoint/<seq>.parquet (one row per commit, per
shard read to its end, per shard failed part way), then deletes the records it folded in and the
older checkpoints, as table formats compact their logs.

Crash-safe at every step: readers take the newest checkpoint plus every record still there, and
the facts merge idempotently (a part by its name, a shard by its URL), so a record deleted late is
only read twice. The checkpoint is created only if its name is free, so two compactions that read
the same state cannot both write the next one.
"""

from __future__ import annotations

import logging

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.faults import failpoint
from pipeline.io.layout import (
    CHECKPOINTS,
    create_exclusive,
    join,
    listing,
    name_of,
    parquet_bytes,
    remove_many,
    url_column,
    urls_of,
)
from pipeline.io.lease import check_lease
from pipeline.io.manifest import CommitRecord, FileFailure, OutputState

log = logging.getLogger(__name__)

# Records (commit and read) read from their own files before a run's recovery compacts them.
COMPACT_AFTER_RECORDS = 64

CHECKPOINT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # commit | done | failed
        ("url", pa.binary()),  # layout.url_column
        ("fingerprint", pa.string()),
        ("rows", pa.int64()),  # rows of a shard read to its end; rows read before a failure
        ("reason", pa.string()),
        ("message", pa.string()),
        ("commit", pa.binary()),  # the commit record, as its own file holds it
    ]
)


def read_checkpoint(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> None:
    """Add the newest checkpoint's facts to state (records already in it are merged, not doubled)."""
    for attempt in range(3):
        paths = sorted(listing(fs, join(root, CHECKPOINTS), ".parquet"))
        if not paths:
            return
        try:
            with fs.open(paths[-1], "rb") as f:
                table = pq.read_table(f, schema=CHECKPOINT_SCHEMA)
        except FileNotFoundError:  # a newer compaction replaced it since the listing
            if attempt == 2:
                raise
            continue
        state.checkpoints = paths
        _merge(state, table)
        return


def _merge(state: OutputState, table: pa.Table) -> None:
    kind = table.column("kind")
    named = {c.part for c in state.commits} | {c.part for c in state.fenced}
    for raw in table.filter(pc.equal(kind, "commit")).column("commit").to_pylist():
        commit = CommitRecord.from_json(raw)
        if commit.part not in named:
            state.commits.append(commit)
    state.done_chunks.append(table.filter(pc.equal(kind, "done")).select(["url", "fingerprint", "rows"]))
    failed = table.filter(pc.equal(kind, "failed"))
    for url, row in zip(urls_of(failed.column("url")), failed.to_pylist(), strict=True):
        failure = FileFailure(url, row["fingerprint"], row["rows"], row["reason"], row["message"])
        state.file_failures.setdefault((url, failure.fingerprint), failure)


def checkpoint_table(state: OutputState) -> pa.Table:
    """Everything the state says is committed or read, one row per fact."""
    failed = state.failures_not_read_to_end()
    n_commits = len(state.commits)
    commits_and_failures = {
        "kind": ["commit"] * n_commits + ["failed"] * len(failed),
        "url": url_column([None] * n_commits + [f.url for f in failed]),
        "fingerprint": [None] * n_commits + [f.fingerprint for f in failed],
        "rows": [c.rows for c in state.commits] + [f.rows_read for f in failed],
        "reason": [None] * n_commits + [f.reason for f in failed],
        "message": [None] * n_commits + [f.message for f in failed],
        "commit": [c.to_json() for c in state.commits] + [None] * len(failed),
    }
    done = state.done  # already columns: copied as they are, not a Python object per shard
    n_done = done.num_rows
    done_rows = {
        "kind": pa.repeat("done", n_done),
        "url": done.column("url"),
        "fingerprint": done.column("fingerprint"),
        "rows": done.column("rows"),
        **{name: pa.nulls(n_done, CHECKPOINT_SCHEMA.field(name).type) for name in ("reason", "message", "commit")},
    }
    return pa.concat_tables(
        [pa.table(commits_and_failures, schema=CHECKPOINT_SCHEMA), pa.table(done_rows, schema=CHECKPOINT_SCHEMA)]
    )


def compact(fs: fsspec.AbstractFileSystem, root: str, state: OutputState, lease_token: int) -> bool:
    """Write the state as the next checkpoint and delete what it replaces; only by the lease holder
    (lease_token), on a state that recovery has brought in line. False if another compaction won."""
    if state.fenced or state.staged or state.leftovers:
        raise ValueError("compact() needs a recovered state")
    check_lease(fs, root, lease_token)
    last = int(name_of(state.checkpoints[-1]).split(".")[0]) if state.checkpoints else 0
    path = join(root, CHECKPOINTS, f"{last + 1:010d}.parquet")
    try:
        create_exclusive(fs, path, parquet_bytes(checkpoint_table(state)))
    except FileExistsError:
        log.warning("another compaction of %s wrote %s first; leaving the records as they are", root, path)
        return False
    failpoint("compact.after_checkpoint")
    remove_many(fs, state.records)
    failpoint("compact.after_records")
    remove_many(fs, state.checkpoints)
    log.info("compacted %d records into %s", len(state.records), path)
    state.records, state.checkpoints = [], [path]
    return True
