"""The per-shard facts of an output as Arrow columns, and the lookups that answer "which shards are done".

A Python object per shard (a dict entry, a dataclass, a list of ranges) cost the driver's Python heap
about 900 B per shard at its peak in `status`; as columns the heap holds nothing per shard, and the
questions asked of them (is every row of a shard's current version committed?) are hash lookups and
numpy over integer codes. Only the exceptions (a shard with rows missing or committed twice, shards
left to do) come back to Python. The peak RSS is still per shard (Arrow's buffers and allocator
pages, see benchmarks/RESULTS.md): these functions take any batch of shards, for reading the facts
in bounded, URL-sorted batches next.

The tables, all keyed by the URL as layout.url_column writes it (binary: exact for any file name):
- versions: url, generation, fingerprint: one version of a shard in a generation (from _inputs/);
- done: url, fingerprint, rows: a version read to its end;
- committed: url, generation, ranges, covered, merged, first, last, overlapping: per shard and
  generation, what the commit records hold: how many ranges, the sum of their lengths, the rows of
  their union, the first row and the furthest end, and whether two of them overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.layout import url_column, urls_of
from pipeline.io.ranges import Range

DONE_SCHEMA = pa.schema([("url", pa.binary()), ("fingerprint", pa.string()), ("rows", pa.int64())])
RANGES_SCHEMA = pa.schema(
    [("url", pa.binary()), ("generation", pa.int32()), ("start", pa.int64()), ("end", pa.int64())]
)
VERSION_KEY = ["url", "generation"]
INPUT_COLUMNS = ["url", "generation", "fingerprint", "change"]
"""The columns of the recorded inputs (generations.INPUTS_SCHEMA) that the ledger reads."""


class PackedRanges(Mapping):
    """A part's committed row ranges by shard URL (CommitRecord.ranges), kept as columns: a third of
    the memory of a dict of lists, for the million shards a driver may hold. Read as a dict, made
    afresh on each read: callers go over it once."""

    __slots__ = ("columns", "_shards")

    def __init__(self, ranges: Mapping[str, list[Range]]):
        urls = [url for url, rs in ranges.items() for _ in rs]
        bounds = [(r[0], r[1]) for rs in ranges.values() for r in rs]
        self.columns = pa.table(
            {
                "url": url_column(urls),
                "start": pa.array([b[0] for b in bounds], pa.int64()),
                "end": pa.array([b[1] for b in bounds], pa.int64()),
            }
        )
        self._shards = len(ranges)

    @classmethod
    def of_columns(cls, columns: pa.Table) -> PackedRanges:
        """From a table of url, start, end (one row per range) as it is."""
        packed = cls.__new__(cls)
        packed.columns = columns.select(["url", "start", "end"])
        packed._shards = pc.count_distinct(columns.column("url")).as_py()
        return packed

    def unpacked(self) -> dict[str, list[Range]]:
        ranges: dict[str, list[Range]] = {}
        columns = (urls_of(self.columns.column("url")), *(self.columns.column(c).to_pylist() for c in ("start", "end")))
        for url, start, end in zip(*columns, strict=True):
            ranges.setdefault(url, []).append((start, end))
        return ranges

    def __getitem__(self, url: str) -> list[Range]:
        return self.unpacked()[url]

    def __iter__(self) -> Iterator[str]:
        return iter(self.unpacked())

    def __len__(self) -> int:
        return self._shards

    def items(self):
        return self.unpacked().items()

    def values(self):
        return self.unpacked().values()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.unpacked() == dict(other.items())

    def __repr__(self) -> str:
        return f"PackedRanges({self.unpacked()!r})"


def current_versions(inputs: pa.Table) -> pa.Table:
    """url, generation, fingerprint of every shard's current version: its entry in the latest generation
    that names it, unless that entry deletes it (inputs: generations.INPUTS_SCHEMA or some of its
    columns, in generation order, a URL at most once per generation)."""
    generation = inputs.column("generation").to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(generation)) + 1).tolist(), inputs.num_rows]
    kept, newer = [], []
    # Newest first: an entry is current unless a later generation names its shard. Later generations
    # are a refresh's changes, usually few: the lookups are against them, not the whole input.
    for start, end in reversed(list(zip(bounds, bounds[1:], strict=False))):
        entries = inputs.slice(start, end - start)
        if newer:
            shadowed = pc.is_in(entries.column("url"), value_set=pa.concat_arrays(newer))
            entries = entries.filter(pc.invert(shadowed))
        newer.append(entries.column("url").combine_chunks())
        kept.append(entries.filter(pc.not_equal(entries.column("change"), "deleted")))
    return pa.concat_tables(reversed(kept)).select(["url", "generation", "fingerprint"])


def recorded_versions(inputs: pa.Table) -> pa.Table:
    """url, generation, fingerprint of every version any generation recorded (deletions left out)."""
    kept = inputs.filter(pc.not_equal(inputs.column("change"), "deleted"))
    return kept.select(["url", "generation", "fingerprint"])


def unique_done(chunks: Iterable[pa.Table]) -> pa.Table:
    """done (DONE_SCHEMA) with one row per (url, fingerprint): a version read twice (a retried task) once."""
    table = pa.concat_tables([c.cast(DONE_SCHEMA) for c in chunks] or [DONE_SCHEMA.empty_table()])
    if table.num_rows == 0:
        return table
    unique = table.group_by(["url", "fingerprint"], use_threads=False).aggregate([("rows", "first")])
    return unique.rename_columns({"rows_first": "rows"}).select(DONE_SCHEMA.names).cast(DONE_SCHEMA)


def committed(ranges: pa.Table) -> pa.Table:
    """Per (url, generation): ranges, covered, merged, first, last and overlapping (see the module's
    docstring), from every committed range (RANGES_SCHEMA)."""
    # URLs become integer codes (one copy of each distinct URL); the rest is numpy over integers.
    encoded = pc.dictionary_encode(ranges.column("url").combine_chunks())
    code = encoded.indices.to_numpy().astype(np.int64)
    generation = ranges.column("generation").to_numpy().astype(np.int64)
    start, end = ranges.column("start").to_numpy(), ranges.column("end").to_numpy()
    order = np.lexsort((start, generation, code))
    code, generation, start, end = code[order], generation[order], start[order], end[order]
    same_key = np.zeros(len(code), dtype=bool)  # this range's shard and generation are the previous one's
    same_key[1:] = (code[1:] == code[:-1]) & (generation[1:] == generation[:-1])
    # The rows each range adds to the union of the ones before it in its group: it starts at the
    # furthest end reached so far. One running maximum over all groups, each lifted above the last.
    group = np.cumsum(~same_key) - 1
    span = int(end.max(initial=0)) + 1
    reach = np.maximum.accumulate(group * span + end) - group * span
    previous_reach = np.where(same_key, np.concatenate([[0], reach[:-1]]), start)
    new_rows = np.maximum(0, end - np.maximum(start, previous_reach))
    heads = np.flatnonzero(~same_key)

    def per_group(ufunc, values: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(values, heads) if len(heads) else values[:0]

    covered, merged = per_group(np.add, end - start), per_group(np.add, new_rows)
    return pa.table(
        {
            "url": encoded.dictionary.take(pa.array(code[heads])),
            "generation": pa.array(generation[heads], pa.int32()),
            "ranges": pa.array(np.diff(np.append(heads, len(code)))),
            "covered": pa.array(covered),
            "merged": pa.array(merged),
            "first": pa.array(per_group(np.minimum, start)),
            "last": pa.array(per_group(np.maximum, end)),
            "overlapping": pa.array(covered > merged),
        }
    )


def ledger(versions: pa.Table, done: pa.Table, committed_rows: pa.Table) -> pa.Table:
    """versions (url, generation, fingerprint, ...; one per URL) with what is known of each: rows (when
    read to its end, else null), merged (rows committed in its generation, null where none are),
    overlapping, and complete: read to its end with every row committed (a row committed twice is
    verify's to report, as overlapping)."""
    n = versions.num_rows
    # A hash lookup of each fact's URL among the versions, then numpy: lighter than a join, which
    # would copy every URL again into its result.
    at = positions(done.column("url"), versions.column("url"))
    same = _matches(at, done.column("fingerprint"), versions.column("fingerprint"))
    rows = np.full(n, -1, dtype=np.int64)
    rows[at[same]] = done.column("rows").to_numpy()[same]

    at = positions(committed_rows.column("url"), versions.column("url"))
    same = _matches(at, committed_rows.column("generation"), versions.column("generation"))
    columns = {}
    for name, missing in (("first", -1), ("last", -1), ("merged", -1)):
        values = np.full(n, missing, dtype=np.int64)
        values[at[same]] = committed_rows.column(name).to_numpy()[same]
        columns[name] = values
    overlapping = np.zeros(n, dtype=bool)
    overlapping[at[same]] = committed_rows.column("overlapping").to_numpy(zero_copy_only=False)[same]
    anything_committed = columns["merged"] >= 0

    read = rows >= 0
    # Ranges whose union starts at row 0, ends at the shard's end and holds as many rows as the shard
    # has leave no gap: their union is exactly [0, rows).
    all_rows = (columns["first"] == 0) & (columns["last"] == rows) & (columns["merged"] == rows)
    complete = read & np.where(rows == 0, ~anything_committed, all_rows)
    return (
        versions.append_column("rows", pa.array(rows, mask=~read))
        .append_column("merged", pa.array(columns["merged"], mask=~anything_committed))
        .append_column("overlapping", pa.array(overlapping))
        .append_column("complete", pa.array(complete))
    )


def positions(keys: pa.Array | pa.ChunkedArray, among: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each key's row in among (whose values are unique), -1 where it is not there."""
    found = pc.index_in(keys, value_set=among.combine_chunks() if isinstance(among, pa.ChunkedArray) else among)
    return pc.fill_null(found, -1).to_numpy().astype(np.int64, copy=False)


def _matches(at: np.ndarray, values: pa.ChunkedArray, of_versions: pa.ChunkedArray) -> np.ndarray:
    """Where a fact was found (at >= 0) and its value equals its version's."""
    found = at >= 0
    same = np.zeros(len(at), dtype=bool)
    if found.any():
        theirs = of_versions.take(pa.array(at[found]))
        same[found] = pc.equal(values.filter(pa.array(found)), theirs).to_numpy(zero_copy_only=False)
    return same


def among(facts: pa.Table, versions: pa.Table) -> np.ndarray:
    """Whether each fact's (url, generation) is one of versions' (a URL may have a version in each
    generation): a hash lookup of URLs per generation the facts name."""
    found = np.zeros(facts.num_rows, dtype=bool)
    generations = facts.column("generation")
    for generation in pc.unique(generations).to_pylist():
        mine = pc.equal(generations, generation).to_numpy(zero_copy_only=False)
        theirs = versions.filter(pc.equal(versions.column("generation"), generation)).column("url")
        urls = facts.column("url").filter(pa.array(mine))
        found[mine] = pc.is_in(urls, value_set=theirs.combine_chunks()).to_numpy(zero_copy_only=False)
    return found
