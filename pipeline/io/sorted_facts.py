"""Per-shard facts read in bounded batches: files sorted by URL, merged a URL interval at a time.

The facts of a million shards (which versions are current, which were read to their end, which
rows are committed) would take the driver a GB to hold at once. Written sorted by URL (bytewise, as
layout.url_column encodes it), several such files are read side by side in step: each step takes the
rows of every source up to one URL, so a shard's facts from all sources arrive in the same step, and
memory holds a few batches, not the corpus (benchmarks/RESULTS.md has the measurements).

A file says it is sorted in its Parquet metadata (SORTED_BY); one written before that is read whole
and sorted in memory, as before.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SORTED_BY = {b"neobert.sorted_by": b"url"}
BATCH_ROWS = 8_192
"""Rows a source contributes to one step, and the row group size of a sorted file: the memory of a
step is a few of these, whatever the corpus."""


def sorted_by_url(table: pa.Table) -> pa.Table:
    """The table sorted by its url column (bytewise), marked as such in its schema's metadata."""
    return table.take(pc.sort_indices(table.column("url"))).replace_schema_metadata(
        {**(table.schema.metadata or {}), **SORTED_BY}
    )


def is_sorted(schema: pa.Schema) -> bool:
    return all((schema.metadata or {}).get(k) == v for k, v in SORTED_BY.items())


def file_batches(
    fs: fsspec.AbstractFileSystem, path: str, columns: list[str], schema: pa.Schema | None = None
) -> Iterator[pa.Table]:
    """A Parquet file's rows (these columns) in URL order, a row group at a time where it is sorted."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if not is_sorted(parquet.schema_arrow):  # written before files were sorted: whole, sorted here
            yield sorted_by_url(_cast(parquet.read(columns=columns), schema))
            return
        for group in range(parquet.num_row_groups):
            yield _cast(parquet.read_row_group(group, columns=columns), schema)


def _cast(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    return table if schema is None else table.cast(pa.schema([schema.field(n) for n in table.column_names]))


def in_step(sources: list[Iterable[pa.Table]], empty: list[pa.Table]) -> Iterator[list[pa.Table]]:
    """Tables of each source (each sorted by url, its tables in order) over the same URL interval,
    interval after interval: every row of a URL is in the step that holds that URL. empty: each
    source's empty table, for a step where it has no rows."""
    iterators = [iter(s) for s in sources]
    pending: list[list[pa.Table]] = [[] for _ in sources]  # read but not yet given out, per source
    exhausted = [False] * len(sources)

    def read_more(i: int) -> None:
        table = next(iterators[i], None)
        if table is None:
            exhausted[i] = True
        elif table.num_rows:
            pending[i].append(table)

    while True:
        for i in range(len(sources)):
            while not exhausted[i] and sum(t.num_rows for t in pending[i]) < BATCH_ROWS:
                read_more(i)
        if not any(pending):
            return
        # Below the smallest last URL of a source that has more to read: its next table may still
        # hold that URL. A source read to its end bounds nothing.
        lasts = {i: p[-1].column("url")[-1].as_py() for i, p in enumerate(pending) if p and not exhausted[i]}
        bound = min(lasts.values()) if lasts else None
        tables = [pa.concat_tables(p) if p else empty[i] for i, p in enumerate(pending)]
        below = [t.num_rows if bound is None else _rows_below(t, bound) for t in tables]
        if not any(below):  # every row left is at the bound: read on where it is the last URL
            for i, last in lasts.items():
                if last == bound:
                    read_more(i)
            continue
        pending = [[t.slice(n)] if n < t.num_rows else [] for t, n in zip(tables, below, strict=True)]
        yield [t.slice(0, n) for t, n in zip(tables, below, strict=True)]


def _rows_below(table: pa.Table, bound: bytes) -> int:
    """How many of a url-sorted table's first rows have a URL below bound, by bisection: a source's
    pending rows are looked at again at every step."""
    return bisect.bisect_left(table.column("url"), bound, key=lambda url: url.as_py())
