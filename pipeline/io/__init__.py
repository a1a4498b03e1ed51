"""Shards in, Parquet out, over any fsspec filesystem."""
