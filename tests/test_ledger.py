"""The columnar shard ledger: the same answers as the per-shard Python definitions it replaced."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.generations import ADDED, CHANGED, DELETED, INPUTS_SCHEMA, changes_since
from pipeline.io.layout import url_column, url_text, urls_of
from pipeline.io.ledger import RANGES_SCHEMA, committed, current_versions, ledger, unique_done
from pipeline.io.ranges import count_rows, merge_ranges, overlaps
from pipeline.io.shards import Shard, ShardListing


def ranges_table(ranges: dict[tuple[str, int], list[tuple[int, int]]]) -> pa.Table:
    rows = [(url, g, s, e) for (url, g), rs in ranges.items() for s, e in rs]
    return pa.table(
        {
            "url": url_column([r[0] for r in rows]),
            "generation": pa.array([r[1] for r in rows], pa.int32()),
            "start": pa.array([r[2] for r in rows], pa.int64()),
            "end": pa.array([r[3] for r in rows], pa.int64()),
        },
        schema=RANGES_SCHEMA,
    )


def done_table(done: dict[tuple[str, str], int]) -> pa.Table:
    return pa.table(
        {
            "url": url_column([url for url, _ in done]),
            "fingerprint": pa.array([fp for _, fp in done], pa.string()),
            "rows": pa.array(list(done.values()), pa.int64()),
        }
    )


def versions_table(versions: list[tuple[str, int, str]]) -> pa.Table:
    return pa.table(
        {
            "url": url_column([v[0] for v in versions]),
            "generation": pa.array([v[1] for v in versions], pa.int32()),
            "fingerprint": pa.array([v[2] for v in versions], pa.string()),
        }
    )


def completeness(table: pa.Table) -> dict[str, bool]:
    return dict(zip(urls_of(table.column("url")), table.column("complete").to_pylist(), strict=True))


def test_complete_means_read_to_its_end_with_every_row_committed_once():
    versions = versions_table(
        [
            ("s://whole", 0, "a"),
            ("s://gap", 0, "a"),
            ("s://not-read-to-end", 0, "a"),
            ("s://empty", 0, "a"),
            ("s://other-generation", 1, "b"),
            ("s://other-fingerprint", 0, "new"),
            ("s://overlap-and-gap", 0, "a"),  # covers 12 rows in all, as many as it has, with a gap
            ("s://touching", 0, "a"),
            ("s://beyond-its-end", 0, "a"),
        ]
    )
    done = done_table(
        {
            ("s://whole", "a"): 10,
            ("s://gap", "a"): 10,
            ("s://empty", "a"): 0,
            ("s://other-generation", "b"): 5,
            ("s://other-fingerprint", "old"): 5,
            ("s://overlap-and-gap", "a"): 12,
            ("s://touching", "a"): 10,
            ("s://beyond-its-end", "a"): 10,
        }
    )
    ranges = ranges_table(
        {
            ("s://whole", 0): [(0, 4), (4, 10)],
            ("s://gap", 0): [(0, 4), (5, 10)],
            ("s://not-read-to-end", 0): [(0, 3)],
            ("s://other-generation", 0): [(0, 5)],
            ("s://other-fingerprint", 0): [(0, 5)],
            ("s://overlap-and-gap", 0): [(0, 6), (4, 8), (10, 12)],
            ("s://touching", 0): [(5, 10), (0, 5)],
            ("s://beyond-its-end", 0): [(0, 11)],
        }
    )

    assert completeness(ledger(versions, done, committed(ranges))) == {
        "s://whole": True,
        "s://gap": False,
        "s://not-read-to-end": False,
        "s://empty": True,
        "s://other-generation": False,
        "s://other-fingerprint": False,
        "s://overlap-and-gap": False,
        "s://touching": True,
        "s://beyond-its-end": False,
    }


version_ranges = st.lists(
    st.tuples(st.integers(0, 12), st.integers(1, 6)).map(lambda t: (t[0], t[0] + t[1])), max_size=5
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(version_ranges, st.one_of(st.none(), st.integers(0, 14))), min_size=1, max_size=8))
def test_complete_agrees_with_merging_the_ranges_in_python(shards):
    """Ranges whose union is every row, or an empty shard with none: the definition the driver used to
    apply shard by shard with merge_ranges."""
    urls = [f"s://{i}" for i in range(len(shards))]
    versions = versions_table([(url, 0, "f") for url in urls])
    done = done_table({(url, "f"): rows for url, (_, rows) in zip(urls, shards, strict=True) if rows is not None})
    ranges = ranges_table({(url, 0): rs for url, (rs, _) in zip(urls, shards, strict=True) if rs})

    expected = {
        url: rows is not None and merge_ranges(rs) == ([(0, rows)] if rows else [])
        for url, (rs, rows) in zip(urls, shards, strict=True)
    }
    assert completeness(ledger(versions, done, committed(ranges))) == expected
    found = committed(ranges)
    merged = dict(zip(urls_of(found.column("url")), found.column("merged").to_pylist(), strict=True))
    overlapping = dict(zip(urls_of(found.column("url")), found.column("overlapping").to_pylist(), strict=True))
    assert merged == {url: count_rows(merge_ranges(rs)) for url, (rs, _) in zip(urls, shards, strict=True) if rs}
    assert overlapping == {url: bool(overlaps(rs)) for url, (rs, _) in zip(urls, shards, strict=True) if rs}


def test_current_versions_are_each_shards_latest_entry_unless_it_deletes_it():
    entries = [
        ("s://a", 0, "a0", ADDED),
        ("s://b", 0, "b0", ADDED),
        ("s://c", 0, "c0", ADDED),
        ("s://a", 1, "a1", CHANGED),
        ("s://b", 1, None, DELETED),
        ("s://b", 2, "b2", ADDED),  # deleted, then back
        ("s://c", 2, None, DELETED),
    ]
    inputs = pa.table(
        {
            "url": url_column([e[0] for e in entries]),
            "shard": [e[0] for e in entries],
            "format": ["jsonl"] * len(entries),
            "size_bytes": [1] * len(entries),
            "fingerprint": [e[2] for e in entries],
            "generation": pa.array([e[1] for e in entries], pa.int32()),
            "change": [e[3] for e in entries],
        },
        schema=INPUTS_SCHEMA,
    )
    current = current_versions(inputs)
    found = zip(urls_of(current.column("url")), current.column("generation").to_pylist(), strict=True)
    assert dict(found) == {"s://a": 1, "s://b": 2}


def test_a_version_read_twice_is_done_once():
    chunks = [done_table({("s://a", "f"): 3, ("s://b", "f"): 4}), done_table({("s://a", "f"): 3})]
    assert unique_done(chunks).num_rows == 2
    assert unique_done([]).num_rows == 0


def test_changes_since_keeps_the_listing_order_and_sorts_deletions():
    def shard(url: str, fingerprint: str) -> Shard:
        return Shard(url=url, relative_path=url[4:], format="jsonl", size_bytes=1, fingerprint=fingerprint)

    current = versions_table([("s://z", 0, "z"), ("s://a", 0, "a"), ("s://gone-b", 0, "b"), ("s://gone-a", 0, "a")])
    listed = [shard("s://z", "z2"), shard("s://new-2", "n"), shard("s://a", "a"), shard("s://new-1", "n")]
    changes = changes_since(current, ShardListing.of(listed))
    assert [s.url for s in changes.added] == ["s://new-2", "s://new-1"]
    assert [s.url for s in changes.changed] == ["s://z"]
    assert changes.deleted == ["s://gone-a", "s://gone-b"]


def test_a_generations_entries_file_is_written_sorted_a_batch_at_a_time(tmp_path, monkeypatch):
    """A million-shard first run writes its generation's entries from the listing's columns a batch at
    a time, added, changed and deleted merged in URL byte order (a name that is not UTF-8 included),
    into a file read back a row group at a time; its counts and bytes go into the run record."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.io import generations, sorted_facts
    from pipeline.io.generations import Changes, add_generation
    from pipeline.io.layout import join

    monkeypatch.setattr(sorted_facts, "BATCH_ROWS", 2)
    monkeypatch.setattr("pipeline.io.run_record.save_run_record", lambda fs, root, record: None)

    def shard(url: str, size: int) -> Shard:
        return Shard(url=url, relative_path=url[4:], format="jsonl", size_bytes=size, fingerprint=f"f{size}")

    added = ShardListing.of([shard(f"s://a{i}", i) for i in range(5)] + [shard("s://\udce9-raw", 7)])
    changed = ShardListing.of(
        [shard("s://b", 10), shard("s://\ue000", 20), shard("s://\ue001", 0), shard("s://\ue002", 0)]
    )
    # Python puts the escaped byte F0 before U+E000 (EE 80 80); URL byte order puts it after.
    deleted = sorted(["s://a1x", "s://\ue000-gone", "s://\ue001-gone", "s://\udcf0"])
    record = {"generations": [{"generation": 0}]}
    fs = fsspec.filesystem("file")
    assert add_generation(fs, str(tmp_path), record, "s://", Changes(added, changed, deleted), refresh=True) == 1

    parquet = pq.ParquetFile(join(str(tmp_path), record["generations"][1]["inputs_file"]))
    assert sorted_facts.is_sorted(parquet.schema_arrow) and parquet.schema_arrow.remove_metadata() == INPUTS_SCHEMA
    assert all(parquet.metadata.row_group(g).num_rows <= 2 for g in range(parquet.num_row_groups))
    entries = parquet.read()
    expected = [(s.url, ADDED, s.size_bytes) for s in added] + [(s.url, CHANGED, s.size_bytes) for s in changed]
    expected += [(url, DELETED, None) for url in deleted]
    expected.sort(key=lambda e: e[0].encode("utf-8", "surrogateescape"))
    columns = (entries.column("change").to_pylist(), entries.column("size_bytes").to_pylist())
    assert list(zip(urls_of(entries.column("url")), *columns, strict=True)) == expected
    assert set(entries.column("generation").to_pylist()) == {1}
    assert entries.column("shard").to_pylist() == [url_text(url) for url, _, _ in expected]
    assert record["generations"][1] | {"created": None} == {
        "generation": 1,
        "input": "s://",
        "created": None,
        "refresh": True,
        "shards": 10,
        "bytes": sum(range(5)) + 7 + 30,
        "shards_added": 6,
        "shards_changed": 4,
        "shards_deleted": 4,
        "inputs_file": "_inputs/000001.parquet",
    }
    assert generations.recorded_inputs(fs, str(tmp_path), {"generations": record["generations"][1:]}).num_rows == 14
