"""Apply an output's log to a target: upsert the current rows of parts it has not applied, delete the
rows of shard versions that later generations replaced or deleted, save the position, and check
that the target holds as many rows as the view.

The position is saved after every part, so a killed sync re-applies at most one part (its rows then
count as unchanged); the removals of new generations run after the upserts and are idempotent, so
rows that moved to another shard are never deleted with their old version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.errors import TargetConflictError, TargetMismatchError
from pipeline.io.current import part_current_rows
from pipeline.io.layout import PARTS, join
from pipeline.io.storage import filesystem_for
from pipeline.sync.log import Log, Position, read_log
from pipeline.sync.rows import part_columns, schema_of, to_target_rows
from pipeline.sync.targets import open_target

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 20_000
PROGRESS_INTERVAL_S = 10.0


@dataclass
class SyncSummary:
    target: str
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    parts_applied: int = 0
    generations: int = 0
    target_rows: int = 0
    view_rows: int = 0
    wall_s: float = 0.0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.deleted

    def as_dict(self) -> dict:
        return asdict(self)


def sync_output(
    output_url: str,
    target_url: str,
    storage: StorageConfig | None = None,
    *,
    table: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    create_index: bool = False,
    progress: Callable[[str], None] = log.info,
) -> SyncSummary:
    """Bring the target at target_url to exactly the output's current view; what it took."""
    started = time.monotonic()
    fs, root = filesystem_for(output_url, storage or StorageConfig())
    output = read_log(fs, root, output_url)
    schema = schema_of(output.settings)
    target = open_target(target_url, table=table, storage=storage)
    summary = SyncSummary(target.description, generations=output.generations)
    try:
        target.prepare(schema, unique_ids=output.unique_ids)
        position = target.position()
        if position is not None and position.output != output.identity:
            raise TargetConflictError(
                f"{target.description} holds the rows of another output (log {position.output}, this one is "
                f"{output.identity}); sync each output into a table of its own"
            )
        applied = set(position.parts) if position else set()
        done_generations = position.generations if position else 0
        todo = output.to_apply(position)
        progress(
            f"sync: {len(todo)} of {len(output.parts)} parts to apply, generations {done_generations}->"
            f"{output.generations} -> {target.description}"
        )
        columns = part_columns(schema)
        next_line_at = time.monotonic() + PROGRESS_INTERVAL_S
        for commit, shards in todo:
            rows = to_target_rows(part_current_rows(fs, root, commit, shards, columns=columns), schema, commit.part)
            for start in range(0, rows.num_rows, batch_rows):
                done = target.upsert(rows.slice(start, batch_rows))
                summary.inserted += done.inserted
                summary.updated += done.updated
                summary.unchanged += done.unchanged
            applied.add(commit.part)
            target.save_position(Position(output.identity, done_generations, frozenset(applied)))
            summary.parts_applied += 1
            if time.monotonic() >= next_line_at or summary.parts_applied == len(todo):
                next_line_at = time.monotonic() + PROGRESS_INTERVAL_S
                progress(
                    f"sync: part {summary.parts_applied:,}/{len(todo):,}: {summary.inserted:,} inserted, "
                    f"{summary.updated:,} updated, {summary.unchanged:,} unchanged"
                )
        if done_generations < output.generations:
            superseded = output.superseded_since(done_generations)
            progress(f"sync: deleting the rows of {len(superseded):,} replaced or deleted shard versions")
            summary.deleted = target.delete_versions(superseded)
        final = output.position()
        if position != final:
            target.save_position(final)
        if create_index:
            target.create_index("cosine" if output.settings.get("normalize") else "dot")
        summary.target_rows, summary.view_rows = target.count(), view_rows(fs, root, output)
    finally:
        target.close()
    summary.wall_s = round(time.monotonic() - started, 3)
    if summary.target_rows != summary.view_rows:
        raise TargetMismatchError(
            f"{summary.target} holds {summary.target_rows:,} rows but the output's current view has "
            f"{summary.view_rows:,}: rows were changed there by something else, or the view repeats an id "
            "(`neobert-pipeline verify` reports repeated ids); sync into a new table to start clean"
        )
    return summary


def view_rows(fs, root: str, output: Log) -> int:
    """Rows of the current view: a part's footer count where all its shards are current, else counted."""
    total = 0
    for commit, shards in output.parts:
        if len(shards) == len(commit.ranges):
            with fs.open(join(root, PARTS, f"{commit.part}.parquet"), "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        else:
            total += part_current_rows(fs, root, commit, shards, columns=["shard"]).num_rows
    return total
