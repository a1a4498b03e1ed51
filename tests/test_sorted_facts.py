"""Per-shard facts read side by side in URL order: every URL's rows from every source in one step."""

from __future__ import annotations

import fsspec
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io import sorted_facts
from pipeline.io.layout import parquet_bytes
from pipeline.io.sorted_facts import file_batches, in_step, sorted_by_url

URLS = [b"s3://b/a", b"s3://b/a0", b"s3://b/ab", b"s3://b/b", b"s3://b/b\xff"]  # bytewise order; not UTF-8


def source(rows: list[tuple[bytes, int]]) -> pa.Table:
    return sorted_by_url(pa.table({"url": pa.array([u for u, _ in rows], pa.binary()), "value": [v for _, v in rows]}))


def in_tables(table: pa.Table, cuts: list[int]) -> list[pa.Table]:
    """The table cut at these rows: a URL's rows may be split across tables, as across row groups."""
    bounds = sorted({0, table.num_rows, *(c % (table.num_rows + 1) for c in cuts)})
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]


facts = st.lists(st.tuples(st.sampled_from(URLS), st.integers(0, 9)))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(facts, st.lists(st.integers(0, 40), max_size=4)), min_size=1, max_size=4),
    st.integers(1, 4),
)
def test_each_url_comes_whole_from_every_source_in_one_step_and_nothing_is_lost(sources, batch_rows):
    sorted_facts.BATCH_ROWS, before = batch_rows, sorted_facts.BATCH_ROWS
    try:
        tables = [source(rows) for rows, _ in sources]
        empty = [t.schema.empty_table() for t in tables]
        steps = list(in_step([in_tables(t, cuts) for t, (_, cuts) in zip(tables, sources, strict=True)], empty))
    finally:
        sorted_facts.BATCH_ROWS = before
    seen: list[set[bytes]] = []
    for step in steps:
        urls = {u for table in step for u in table.column("url").to_pylist()}
        assert urls, "a step gives something"
        assert not seen or min(urls) > max(seen[-1]), "steps go up in URL order and never share a URL"
        seen.append(urls)
    for i, table in enumerate(tables):
        got = pa.concat_tables([step[i] for step in steps]) if steps else table.slice(0, 0)
        assert got.to_pylist() == table.to_pylist(), "every row of every source, once, in order"


def test_a_file_written_before_sorting_is_read_whole_and_sorted(tmp_path):
    fs = fsspec.filesystem("file")
    table = pa.table({"url": pa.array([b"c", b"a", b"b"]), "n": [3, 1, 2]})
    (tmp_path / "old.parquet").write_bytes(parquet_bytes(table, 1))
    (tmp_path / "new.parquet").write_bytes(parquet_bytes(sorted_by_url(table), 1))
    old = list(file_batches(fs, str(tmp_path / "old.parquet"), ["url", "n"]))
    new = list(file_batches(fs, str(tmp_path / "new.parquet"), ["url", "n"]))
    assert len(old) == 1 and len(new) == 3, "a sorted file is read a row group at a time"
    assert pa.concat_tables(old).column("n").to_pylist() == pa.concat_tables(new).column("n").to_pylist() == [1, 2, 3]
