"""Small deterministic corpora for job tests, written as real shards."""

from __future__ import annotations

import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

WORDS = "search retrieval embedding shard object storage cluster token document vector lake night batch".split()


def make_docs(n: int, seed: int, prefix: str, max_words: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"{prefix}-{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))}
        for i in range(n)
    ]


def jsonl_bytes(docs: list[dict], compression: str | None = None) -> bytes:
    raw = "".join(json.dumps(d) + "\n" for d in docs).encode()
    if compression == "gz":
        return gzip.compress(raw)
    if compression == "zst":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def parquet_bytes(docs: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(docs), sink)
    return sink.getvalue()
