"""The output's commit protocol: what is committed is exactly what the commit records say.

A part is written to _staging (atomically), then its commit record, then it is moved to parts/.
Read tasks record the shards they read to their end (or that failed part way), one record per task.
From time to time the lease holder compacts these small records into one checkpoint (compaction.py),
so reading the state costs a few requests however many shards the input has.
A crash before the commit record leaves an uncommitted part that the next run deletes; a crash
after it leaves a committed part that the next run publishes (recovery.py). Part names are a hash
of the rows they hold, so a retried write of the same rows replaces itself instead of duplicating.
Each commit record names the writer lease token it was made under (lease.py): one made after a
later token was taken is a lost writer's, and is set aside here as fenced, never counted.
The folders are in layout.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.layout import (
    COMMITS,
    ERRORS,
    FAILED,
    PARTS,
    READS,
    SHARDS,
    STAGING,
    VACUUM,
    atomic_write,
    cat_many,
    exists_now,
    join,
    listing,
    name_of,
    url_column,
    urls_of,
)
from pipeline.io.lease import fences
from pipeline.io.ledger import DONE_SCHEMA, RANGES_SCHEMA, PackedRanges, unique_done
from pipeline.io.ranges import Range, merge_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitRecord:
    """One committed part and exactly which input rows it accounts for: embedded or dead-lettered."""

    part: str
    rows: int
    """Input rows accounted for, embedded and dead-lettered together."""
    ranges: Mapping[str, list[Range]]
    """Row ranges by shard URL (a ledger.PackedRanges when read back: columns, not lists)."""
    generation: int
    error_counts: dict[str, int] = field(default_factory=dict)
    """Dead-lettered rows by reason code; they are in errors/<part>.parquet, the rest in parts/."""
    lease_token: int = 0
    """The writer lease token it was committed under; 0 for a run without a lease."""

    @property
    def error_rows(self) -> int:
        return sum(self.error_counts.values())

    @property
    def embedded_rows(self) -> int:
        return self.rows - self.error_rows

    def to_json(self, *, with_ranges: bool = True) -> bytes:
        """The record as its own file holds it; with_ranges=False leaves out the ranges (a sorted
        checkpoint holds them as rows of their own)."""
        record = {"part": self.part, "rows": self.rows, "generation": self.generation}
        if with_ranges:  # unpacked into Python lists only when written
            record["ranges"] = dict(self.ranges.items())
        record |= {"error_counts": self.error_counts, "lease_token": self.lease_token}
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CommitRecord:
        data = json.loads(raw)
        return cls(
            data["part"],
            data["rows"],
            PackedRanges(data.get("ranges", {})),
            data["generation"],
            data.get("error_counts", {}),
            data.get("lease_token", 0),
        )

    def ranges_table(self) -> pa.Table:
        """Its ranges as rows of ledger.RANGES_SCHEMA."""
        packed = self.ranges if isinstance(self.ranges, PackedRanges) else PackedRanges(self.ranges)
        generation = pa.repeat(pa.scalar(self.generation, pa.int32()), packed.columns.num_rows)
        return packed.columns.add_column(1, "generation", generation).cast(RANGES_SCHEMA)

    def files(self) -> list[tuple[str, str]]:
        """(staged name, published path) of each file the part has, relative to the output root."""
        files = []
        if self.embedded_rows:
            files.append((f"{self.part}.parquet", f"{PARTS}/{self.part}.parquet"))
        if self.error_rows:
            files.append((f"{self.part}.errors.parquet", f"{ERRORS}/{self.part}.parquet"))
        return files


@dataclass(frozen=True, slots=True)  # one per shard: a million of them on the driver
class FileFailure:
    """A shard that could not be read to its end: the rows before the failure are committed as usual."""

    url: str
    fingerprint: str
    rows_read: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ShardDone:
    """A shard read to its end (as a read task reports it; the driver holds them as columns: OutputState.done)."""

    url: str
    fingerprint: str
    rows: int


ShardKey = tuple[str, str]
"""(URL, fingerprint): one version of a shard. A rewritten shard is another version, embedded again."""


@dataclass
class OutputState:
    """What an output folder holds, read in a handful of listings."""

    commits: list[CommitRecord] = field(default_factory=list)
    fenced: list[CommitRecord] = field(default_factory=list)
    """Commit records a run made after it had lost the writer lease: not committed (recovery quarantines them)."""
    done_chunks: list[pa.Table] = field(default_factory=list)
    """Shards read to their end (ledger.DONE_SCHEMA), as the records and the checkpoint list them: see done."""
    file_failures: dict[ShardKey, FileFailure] = field(default_factory=dict)
    published: set[str] = field(default_factory=set)
    """Relative paths of the files under parts/ and errors/."""
    staged: set[str] = field(default_factory=set)
    """Names of the files under _staging/."""
    leftovers: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    """Paths of the commit and read records read from their own files (not from a checkpoint)."""
    record_parts: set[str] = field(default_factory=set)
    """Parts whose commit record was read from its own file: where a checkpoint holds one too (a
    compaction stopped before deleting the record), the record's is the one that counts."""
    facts_in_records: int = 0
    """Per-shard facts (a shard's range in a part, a shard read or failed) those records hold."""
    checkpoints: list[str] = field(default_factory=list)
    """Paths of the checkpoints there, oldest first; the state holds the last one's contents."""
    checkpoint_times: dict[str, float] = field(default_factory=dict)
    """When each was written, by the store's clock (compaction.CHECKPOINT_GRACE_S)."""
    vacuuming: set[str] = field(default_factory=set)
    """Parts an interrupted vacuum was deleting (_vacuum.json): their files are no orphans."""
    facts_in_checkpoint: bool = False
    """Whether the checkpoint's done shards and ranges were left in its file (read_state(shard_facts=False)):
    done, ranges() and the checkpointed commits' ranges then hold only the records' facts."""
    current: pa.Table | None = None
    """The current input's versions (ledger.current_versions: url, fingerprint, ...), once known:
    failures of other versions of a shard are then history, not failed files."""

    @property
    def done(self) -> pa.Table:
        """Every shard version read to its end, once (ledger.DONE_SCHEMA): columns, not a Python object
        per shard, for a million of them."""
        if len(self.done_chunks) != 1:
            self.done_chunks = [unique_done(self.done_chunks)]
        return self.done_chunks[0]

    def done_rows(self, urls: list[str]) -> dict[ShardKey, int]:
        """(URL, fingerprint) -> rows of the versions of these shards read to their end."""
        done = self.done.filter(pc.is_in(self.done.column("url"), url_column(urls)))
        keys = zip(urls_of(done.column("url")), done.column("fingerprint").to_pylist(), strict=True)
        return dict(zip(keys, done.column("rows").to_pylist(), strict=True))

    def ranges(self) -> pa.Table:
        """Every committed range (ledger.RANGES_SCHEMA), built a part at a time."""
        return pa.concat_tables([c.ranges_table() for c in self.commits] or [RANGES_SCHEMA.empty_table()])

    def committed_ranges(self, generation: int | None = None, urls: list[str] | None = None) -> dict[str, list[Range]]:
        """Committed row ranges by shard URL: of one generation, or of all of them; of these shards, or
        of all of them."""
        ranges = self.ranges()
        if generation is not None:
            ranges = ranges.filter(pc.equal(ranges.column("generation"), generation))
        if urls is not None:
            ranges = ranges.filter(pc.is_in(ranges.column("url"), url_column(urls)))
        by_shard: dict[str, list[Range]] = {}
        columns = (urls_of(ranges.column("url")), ranges.column("start").to_pylist(), ranges.column("end").to_pylist())
        for url, start, end in zip(*columns, strict=True):
            by_shard.setdefault(url, []).append((start, end))
        return {url: merge_ranges(ranges) for url, ranges in by_shard.items()}

    @property
    def committed_rows(self) -> int:
        return sum(c.rows for c in self.commits)

    @property
    def embedded_rows(self) -> int:
        return sum(c.embedded_rows for c in self.commits)

    def error_counts(self, failed: list[FileFailure] | None = None) -> dict[str, int]:
        """Dead-lettered rows by reason, plus one per failed file under 'file:<reason>' (failed, or
        failed_part_way())."""
        counts: dict[str, int] = {}
        for commit in self.commits:
            for reason, n in commit.error_counts.items():
                counts[reason] = counts.get(reason, 0) + n
        for failure in self.failed_part_way() if failed is None else failed:
            counts[f"file:{failure.reason}"] = counts.get(f"file:{failure.reason}", 0) + 1
        return dict(sorted(counts.items()))

    def failures_not_read_to_end(self) -> list[FileFailure]:
        """Failed reads, by (URL, fingerprint), of versions no read finished (whether current or not)."""
        done = self.done_rows(sorted({url for url, _ in self.file_failures}))
        return [f for key, f in sorted(self.file_failures.items()) if key not in done]

    def failed_part_way(self) -> list[FileFailure]:
        """Shards whose last read failed before their end (a later complete read of the same version
        supersedes a failure; so does a newer version, once the current input is known)."""
        failed = self.failures_not_read_to_end()
        if self.current is not None and failed:
            now = self.current.filter(pc.is_in(self.current.column("url"), url_column([f.url for f in failed])))
            current = dict(zip(urls_of(now.column("url")), now.column("fingerprint").to_pylist(), strict=True))
            failed = [f for f in failed if current.get(f.url) == f.fingerprint]
        return failed

    def unpublished(self, commit: CommitRecord) -> list[tuple[str, str]]:
        return [(staged, target) for staged, target in commit.files() if target not in self.published]

    def orphans(self) -> list[str]:
        """Published files that no commit record names (nor an interrupted vacuum), sorted."""
        named = {target for commit in self.commits for _, target in commit.files()}
        return sorted(p for p in self.published - named if _part_of(p) not in self.vacuuming)

    def vacuum_leftovers(self) -> list[str]:
        """Files of parts an interrupted vacuum had withdrawn but not yet deleted."""
        named = {commit.part for commit in self.commits}
        return sorted(p for p in self.published if _part_of(p) in self.vacuuming - named)

    def uncommitted(self) -> list[str]:
        """Staged files that no commit record names, sorted."""
        named = {staged for commit in self.commits for staged, _ in commit.files()}
        return sorted(self.staged - named)


def _part_of(path: str) -> str:
    return name_of(path).removesuffix(".parquet")


def read_state(fs: fsspec.AbstractFileSystem, root: str, *, shard_facts: bool = True) -> OutputState:
    """The output's state, in a handful of listings and requests. shard_facts=False leaves the
    checkpoint's per-shard facts in its file, to be read in batches (compaction.shard_facts_in_batches).

    Staging is listed before the commit records, and they before the published files: a part
    staged, committed and published while this reads is then named by a record this read sees, so
    recovery never takes a committed part for an uncommitted one. Records are read before the
    checkpoint: a record that a compaction deletes meanwhile is in the checkpoint listed after it.
    """
    from pipeline.io.compaction import read_checkpoint  # compaction builds on this module

    state = OutputState()
    for path in listing(fs, join(root, STAGING)):
        if path.endswith(".parquet"):
            state.staged.add(name_of(path))
        else:
            state.leftovers.append(path)
    records = _Records(fs, root)
    records.read(state, list(records.commits))
    records.read(state, records.reads)
    read_checkpoint(fs, root, state, shard_facts=shard_facts)
    if exists_now(fs, join(root, VACUUM)):
        state.vacuuming = set(json.loads(fs.cat_file(join(root, VACUUM)))["parts"])
    for folder in (PARTS, ERRORS):
        state.published |= {f"{folder}/{name_of(p)}" for p in listing(fs, join(root, folder), ".parquet")}
    return state


class _Records:
    """The commit and read records there, listed (commits with their store time), read on demand."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.takeovers = fences(fs, root)
        self.commits = listing(fs, join(root, COMMITS), ".json")
        self.reads = [p for folder in (READS, SHARDS, FAILED) for p in listing(fs, join(root, folder), ".json")]

    def read(self, state: OutputState, paths: list[str], *, lost_writers: bool = True) -> None:
        """Add the records at these paths to state; lost_writers=False leaves out, unread by state,
        the commits of a writer that had lost the lease (recovery's to quarantine)."""
        for path, raw in cat_many(self.fs, paths, missing_ok=True):
            if path not in self.commits:
                state.facts_in_records += add_read_record(state, json.loads(raw))
                state.records.append(path)
                continue
            commit = CommitRecord.from_json(raw)
            # A lower token's commit made once a later token had taken the lease over: a lost writer's.
            lost = any(commit.lease_token < token and self.commits[path] >= taken for token, taken in self.takeovers)
            if lost and not lost_writers:
                continue
            (state.fenced if lost else state.commits).append(commit)
            state.record_parts.add(commit.part)
            state.records.append(path)
            state.facts_in_records += len(commit.ranges)


# The most record files fetched at once while reading records in batches (concurrently on object stores).
RECORDS_PER_FETCH = 16


def records_in_batches(fs: fsspec.AbstractFileSystem, root: str, max_facts: int) -> Iterator[OutputState]:
    """The commit and read records there, as states that each hold records naming about max_facts
    per-shard facts and nothing else: for compacting them a batch at a time. Records are fetched a
    few at a time, as many as the facts per record so far say fit (a commit record may name 10^5
    shards). A lost writer's commits are left out (recovery's to quarantine)."""
    records = _Records(fs, root)
    paths = [*sorted(records.commits), *sorted(records.reads)]
    state, facts, fetched = OutputState(), 0, 0
    while fetched < len(paths):
        per_record = max(1, facts // fetched) if fetched else max_facts
        count = min(RECORDS_PER_FETCH, max(1, (max_facts - state.facts_in_records) // per_record))
        before = state.facts_in_records
        records.read(state, paths[fetched : fetched + count], lost_writers=False)
        facts, fetched = facts + state.facts_in_records - before, fetched + count
        if state.facts_in_records >= max_facts:
            yield state
            state = OutputState()
    if state.records:
        yield state


def add_read_record(state: OutputState, data: dict) -> int:
    """Add what a read record says; a version read to its end anywhere is no failure any more.
    Returns how many shards it names."""
    if "done" not in data and "failed" not in data:  # manifest version 1: one file per shard
        data = {"failed": [data]} if "reason" in data else {"done": [data]}
    done = data.get("done", [])
    if done:
        columns = {
            "url": url_column([d["url"] for d in done]),
            "fingerprint": [d["fingerprint"] for d in done],
            "rows": [d["rows"] for d in done],
        }
        state.done_chunks.append(pa.table(columns, schema=DONE_SCHEMA))
    for failed in data.get("failed", []):
        state.file_failures[failed["url"], failed["fingerprint"]] = FileFailure(**failed)
    return len(done) + len(data.get("failed", []))


def dead_letter_example(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> str | None:
    """'<reason>: <message> (<shard> row <row>)' for one dead letter of the commonest reason, or None."""
    counts = state.error_counts(failed=[])  # rows only: no failed file is asked for
    if not counts:
        return None
    reason = max(counts, key=counts.get)
    commit = next(c for c in state.commits if c.error_counts.get(reason))
    errors = pq.read_table(fs.open(join(root, ERRORS, f"{commit.part}.parquet"), "rb"))
    row = next(r for r in errors.to_pylist() if r["reason"] == reason)
    return f"{reason}: {row['message']} ({row['shard']} row {row['row']})"


def write_read_record(
    fs: fsspec.AbstractFileSystem, root: str, done: list[ShardDone], failed: list[FileFailure]
) -> None:
    """One read task's outcomes, under a name of its own (a retried task adds the same facts again)."""
    record = {"done": [dataclasses.asdict(d) for d in done], "failed": [dataclasses.asdict(f) for f in failed]}
    atomic_write(fs, join(root, READS, f"{uuid.uuid4().hex}.json"), json.dumps(record).encode())
