"""What recovery costs the driver when the records it folds into the checkpoint name every shard
(not in `make test`).

A run whose small shards all commit in its last minute (or a crash that left a run's records) leaves
commit and read records naming every shard: --shards shards in --commits commit records and --reads
read records, written here directly (the records a first run of benchmarks.scale's corpus writes).
Each --fold-facts value then runs the lease holder's recovery in a fresh process, folding them with
compaction.FOLD_FACTS set to it, and prints its peak RSS and wall time; 0 folds every record at once,
as before batches. On local files, no Ray.

Run: `python -m benchmarks.fold_records --shards 1000000 --fold-facts 0 100000 250000`
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from benchmarks.scale_child import peak_rss_mb
from benchmarks.scratch import scratch_folder
from pipeline.config import StorageConfig
from pipeline.io.layout import COMMITS, atomic_write, join
from pipeline.io.manifest import CommitRecord, ShardDone, write_read_record
from pipeline.io.storage import filesystem_for


def write_records(folder: str, shards: int, commits: int, reads: int) -> None:
    fs, root = filesystem_for(folder, StorageConfig())
    url = "file:///corpus/in/shard-{:08d}.jsonl".format
    for part in range(commits):
        named = range(part * shards // commits, (part + 1) * shards // commits)
        record = CommitRecord(f"part-{part:05d}", 2 * len(named), {url(i): [(0, 2)] for i in named}, 0, {}, 1)
        atomic_write(fs, join(root, COMMITS, f"{record.part}.json"), record.to_json())
    for task in range(reads):
        named = range(task * shards // reads, (task + 1) * shards // reads)
        write_read_record(fs, root, [ShardDone(url(i), f"size=300,mtime={i}", 2) for i in named], [])


def fold(folder: str, fold_facts: int) -> dict:
    """The lease holder's recovery of folder (in this process), folding FOLD_FACTS facts at a time."""
    from pipeline.io import compaction
    from pipeline.io.lease import acquire_lease
    from pipeline.io.recovery import recover

    if fold_facts:
        compaction.FOLD_FACTS = fold_facts
    else:  # every record at once, as before records were folded in batches
        compaction.FOLD_FACTS = 10**12
    fs, root = filesystem_for(folder, StorageConfig())
    started = time.monotonic()
    with acquire_lease(fs, root) as lease:
        state = recover(fs, root, lease.token, shard_facts=False)
    return {
        "fold_facts": fold_facts,
        "wall_s": round(time.monotonic() - started, 2),
        "peak_rss_mb": peak_rss_mb(),
        "checkpoints_written": int(state.checkpoints[-1].rsplit("/", 1)[-1].split(".")[0]),
        "records_left": len(state.records),
        "committed_rows": state.committed_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1_000_000)
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--fold-facts", type=int, nargs="+", default=[0, 250_000])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fold(args.child, args.fold_facts[0])))
        return
    work = scratch_folder("neobert-fold-records-")
    write_records(str(work / "records"), args.shards, args.commits, args.reads)
    facts = 2 * args.shards
    print(f"{args.shards:,} shards: {facts:,} facts in {args.commits} commit and {args.reads} read records")
    results = []
    for fold_facts in args.fold_facts:
        shutil.copytree(work / "records", work / "out", dirs_exist_ok=False)
        child = [sys.executable, "-m", "benchmarks.fold_records", "--child", str(work / "out")]
        ran = subprocess.run([*child, "--fold-facts", str(fold_facts)], capture_output=True, text=True, check=True)
        shutil.rmtree(work / "out")
        result = json.loads(ran.stdout.strip().splitlines()[-1])
        assert result["records_left"] == 0 and result["committed_rows"] == 2 * args.shards, result
        results.append(result)
        label = "all at once" if not fold_facts else f"{fold_facts:,} facts a batch"
        print(
            f"{label:>24}: peak RSS {result['peak_rss_mb']:,.0f} MB, {result['wall_s']:.1f} s, "
            f"{result['checkpoints_written']} checkpoints written"
        )
    if len(results) > 1:
        first = results[0]
        for result in results[1:]:
            rss, wall = result["peak_rss_mb"] / first["peak_rss_mb"], result["wall_s"] / first["wall_s"]
            label = f"{result['fold_facts']:,} against {first['fold_facts']:,}"
            print(f"{label}: peak RSS x{rss:.2f}, wall time x{wall:.2f}")


if __name__ == "__main__":
    main()
