"""`status`: how far the job writing an output got, as facts a person or a monitor reads."""

from __future__ import annotations

import time

from pipeline.config import StorageConfig
from pipeline.io.generations import ADDED, CHANGED, DELETED, generation_rows, shard_counts
from pipeline.io.lease import read_lease
from pipeline.io.manifest import read_state
from pipeline.io.run_record import read_run_record
from pipeline.io.storage import filesystem_for

CHANGES = (ADDED, CHANGED, DELETED)


def output_status(output_url: str, storage: StorageConfig | None = None) -> dict:
    """The output's state in plain values (what `status --json` prints)."""
    fs, root = filesystem_for(output_url, storage or StorageConfig())
    record = read_run_record(fs, root)
    if record is None:
        return {"output": output_url, "started": False}
    for attempt in range(3):
        state = read_state(fs, root, shard_facts=False)
        try:
            counts, failed = shard_counts(fs, root, record, state)
            break
        except FileNotFoundError:  # a run's compaction replaced the checkpoint while it was read: again
            if attempt == 2:
                raise
    rows_by_generation = generation_rows(state)
    last_run = record["runs"][-1] if record.get("runs") else None
    lease = read_lease(fs, root, now_s=time.time())
    writer = None
    if lease is not None:
        writer = {
            **{k: getattr(lease.holder, k) for k in ("run_id", "host", "pid", "started_at", "token")},
            "running": lease.live,
            "released": lease.released,
            "heartbeat_age_s": round(lease.heartbeat_age_s, 1),
        }
    unfinished = bool(state.commits) and last_run is None
    if lease is not None:  # the lease knows: a run that neither released it nor still renews it stopped
        unfinished = not lease.released and not lease.live
    return {
        "output": output_url,
        "started": True,
        "model_source": record["settings"]["model_source"],
        "model_weights_sha256": record["settings"]["model_weights_sha256"],
        "rows_committed": state.committed_rows,
        "rows_embedded": state.embedded_rows,
        "rows_dead_lettered": state.committed_rows - state.embedded_rows,
        "rows_in_shards_read": counts["rows_read"] + sum(f.rows_read for f in failed),
        "dead_letters_by_reason": state.error_counts(failed),
        "shards": counts["shards"],
        "shards_complete": counts["complete"],
        "shards_read": counts["read"],
        "shards_failed_part_way": len(failed),
        "generations": [
            {
                "generation": g["generation"],
                "created": g.get("created"),
                "refresh": g.get("refresh", False),
                **{kind: g.get(f"shards_{kind}", _added_v1(g) if kind == ADDED else 0) for kind in CHANGES},
                "rows_committed": rows_by_generation.get(g["generation"], 0),
            }
            for g in record["generations"]
        ],
        "parts_committed": len(state.commits),
        "uncommitted_leftovers": len(state.staged | set(state.leftovers)),
        "last_run": None if last_run is None else {k: last_run[k] for k in ("documents", "wall_s", "already_complete")},
        "writer": writer,
        "unfinished_run": unfinished,
    }


def _added_v1(generation: dict) -> int:
    """Shards a generation recorded before refreshes existed added (it could only add)."""
    return generation.get("shards", len(generation.get("inputs", [])))
