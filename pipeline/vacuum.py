"""`vacuum`: delete the parts none of whose rows are current any more (every shard they hold was
rewritten or deleted since), except those of the newest generations kept for a look back.

Crash-safe and never touching a current row: holding the writer lease, it notes the parts it will
delete (_vacuum.json), withdraws their commits by writing a checkpoint without them (the moment they
stop being part of the output), then deletes their files and the note. A kill at any step leaves an
output that verify passes: before the checkpoint the parts are still committed, after it their files
are known leftovers that the next vacuum or run deletes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.config import StorageConfig
from pipeline.errors import NoInputError, SettingsError
from pipeline.faults import failpoint
from pipeline.io.compaction import compact
from pipeline.io.current import current_shards
from pipeline.io.generations import recorded_inputs
from pipeline.io.layout import RUN_RECORD, VACUUM, atomic_write, join
from pipeline.io.lease import acquire_lease, lease_supported
from pipeline.io.ledger import INPUT_COLUMNS, current_versions
from pipeline.io.recovery import finish_vacuum, recover
from pipeline.io.run_record import read_run_record
from pipeline.io.storage import filesystem_for


@dataclass
class VacuumReport:
    parts: list[str] = field(default_factory=list)
    """The parts deleted (or, with dry_run, that would be)."""
    rows: int = 0
    """Rows they held, embedded and dead-lettered: none of them current."""
    kept_generations: list[int] = field(default_factory=list)


def vacuum_output(
    output_url: str,
    storage: StorageConfig | None = None,
    *,
    keep_generations: int = 1,
    dry_run: bool = False,
    wait_s: float = 0.0,
) -> VacuumReport:
    """Delete every part with no current row whose generation is older than the newest keep_generations."""
    fs, root = filesystem_for(output_url, storage or StorageConfig())
    if read_run_record(fs, root) is None:
        raise NoInputError(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
    if not lease_supported(fs):
        raise SettingsError(f"{output_url}: vacuum needs the writer lease, which this store cannot give here")
    with acquire_lease(fs, root, wait_s=wait_s) as lease:
        # The record as it is once no run can add a generation: one read before the lease could miss
        # a generation a run finished meanwhile, and take its parts for superseded.
        record = read_run_record(fs, root)
        newest = len(record["generations"]) - 1
        kept = list(range(max(0, newest - keep_generations + 1), newest + 1))
        state = recover(fs, root)
        current = current_versions(recorded_inputs(fs, root, record, INPUT_COLUMNS))
        live = current_shards(state.commits, current)
        dead = [c for c, shards in zip(state.commits, live, strict=True) if c.generation not in kept and not shards]
        report = VacuumReport([c.part for c in dead], sum(c.rows for c in dead), kept)
        if dry_run or not dead:
            return report
        atomic_write(fs, join(root, VACUUM), json.dumps({"parts": sorted(report.parts)}).encode())
        state.vacuuming = set(report.parts)
        failpoint("vacuum.after_note")
        state.commits = [c for c in state.commits if c not in dead]
        compact(fs, root, state, lease.token)  # from here on they are no part of the output
        failpoint("vacuum.after_checkpoint")
        finish_vacuum(fs, root, state)
    return report
