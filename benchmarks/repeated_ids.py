"""What the duplicate-id listing (`--duplicate-ids flag|reject`) costs when the input grows (not in `make test`).

A corpus of --shards synthetic shards (benchmarks.scale's layout: unique ids), listed once as a first
run does; then --added new shards (each repeating the ids of one of the first shards), listed again
as the next run over the grown input does. Prints, for each listing, its wall time and the shards it read from the
input, and the ratio of the two listings' times. On local Ray (this machine's cores).

Run: `python -m benchmarks.repeated_ids --shards 100000 --added 1000`
(PYTHONPATH=<another checkout> runs its pipeline, to compare with it).
"""

from __future__ import annotations

import argparse
import json
import time

import ray

import pipeline.duplicate_ids as duplicate_ids
from benchmarks.scale import write_corpus
from benchmarks.scratch import scratch_folder
from pipeline.config import StorageConfig, load_config
from pipeline.io.shards import discover_shards
from pipeline.io.storage import filesystem_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--added", type=int, default=1_000)
    parser.add_argument("--rows-per-shard", type=int, default=2)
    args = parser.parse_args()
    work = scratch_folder("neobert-repeated-ids-")
    write_corpus(None, str(work / "in"), args.shards, args.rows_per_shard)
    config = load_config(
        None,
        {"input": str(work / "in"), "output": str(work / "out"), "model": "unused", "id_field": "id"}
        | {"duplicate_ids": "flag"},
    )
    read: list[int] = []
    datasource = duplicate_ids.ShardDatasource

    def counting(shards, *rest):
        read.append(len(shards))
        return datasource(shards, *rest)

    duplicate_ids.ShardDatasource = counting
    ray.init(include_dashboard=False, logging_level="WARNING")
    fs, path = filesystem_for(config.input, StorageConfig())
    results = []
    for label in ("first listing", "after the input grew"):
        if results:  # new shards in a folder of their own; each repeats an id of the first shard
            write_corpus(None, str(work / "in" / "zz-added"), args.added, args.rows_per_shard)
        shards = discover_shards(fs, path)
        read.clear()
        started = time.monotonic()
        duplicate_ids.rows_to_reject(config, shards)
        wall = time.monotonic() - started
        done = json.loads((work / "out" / "duplicates" / "_done.json").read_text())
        results.append({"listing": label, "shards": len(shards), "read": sum(read), "wall_s": round(wall, 2)})
        results[-1]["repeats"] = done["repeats"]
        print(json.dumps(results[-1]), flush=True)
    print(f"second listing / first: {results[1]['wall_s'] / results[0]['wall_s']:.2f}x the time")
    ray.shutdown()


if __name__ == "__main__":
    main()
