"""Shards in, Parquet out, over any fsspec filesystem."""

from __future__ import annotations


def __getattr__(name: str):
    # pipeline.io.current_rows without importing the whole io package on every `import pipeline.io.x`.
    if name == "current_rows":
        from pipeline.io.current import current_rows

        return current_rows
    raise AttributeError(f"module 'pipeline.io' has no attribute {name!r}")
