"""The output folder's commit protocol: what is committed is exactly what the commit records say.

Layout under the output root:

    _neobert_run.json          run record: model, settings, inputs by generation (written first)
    _staging/<part>.parquet    a part written but maybe not committed yet
    _commits/<part>.json       commit record: the part's rows as (shard, row ranges); THE commit point
    parts/<part>.parquet       committed embeddings, published after its commit record
    errors/<part>.parquet      the same part's dead letters: rows that could not be embedded, and why
    _shards/<key>.json         a shard read to its end: its URL, fingerprint and row count
    _failed/<key>.json         a shard that failed part way (corrupt, denied, vanished): rows read, reason
    duplicates.parquet         with duplicate_ids flag/reject: every repeat of an id and where its first is

A part is written to _staging (atomically), then its commit record, then it is moved to parts/.
A crash before the commit record leaves an uncommitted part that the next run deletes; a crash
after it leaves a committed part that the next run publishes. Part names are a hash of the rows
they hold, so a retried write of the same rows replaces itself instead of duplicating.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.ranges import Range, merge_ranges

log = logging.getLogger(__name__)

RUN_RECORD = "_neobert_run.json"
STAGING = "_staging"
COMMITS = "_commits"
PARTS = "parts"
ERRORS = "errors"
SHARDS = "_shards"
FAILED = "_failed"
DUPLICATES = "duplicates.parquet"


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or nothing: object stores put atomically; local files are renamed."""
    if _is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    """A whole Parquet file in memory (zstd), for atomic_write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Rename locally (atomic); server-side copy then delete on object stores (the copy is atomic)."""
    if _is_local(fs):
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(source, target)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def part_name(shard_rows: dict[str, list[Range]]) -> str:
    """Deterministic name from the rows a part holds."""
    digest = hashlib.sha256(json.dumps(sorted(shard_rows.items())).encode()).hexdigest()
    return f"part-{digest[:32]}"


def shard_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CommitRecord:
    """One committed part and exactly which input rows it accounts for: embedded or dead-lettered."""

    part: str
    rows: int
    """Input rows accounted for, embedded and dead-lettered together."""
    ranges: dict[str, list[Range]]
    generation: int
    error_counts: dict[str, int] = field(default_factory=dict)
    """Dead-lettered rows by reason code; they are in errors/<part>.parquet, the rest in parts/."""

    @property
    def error_rows(self) -> int:
        return sum(self.error_counts.values())

    @property
    def embedded_rows(self) -> int:
        return self.rows - self.error_rows

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "part": self.part,
                "rows": self.rows,
                "generation": self.generation,
                "ranges": self.ranges,
                "error_counts": self.error_counts,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CommitRecord:
        data = json.loads(raw)
        ranges = {url: [tuple(r) for r in rs] for url, rs in data["ranges"].items()}
        return cls(data["part"], data["rows"], ranges, data["generation"], data.get("error_counts", {}))

    def files(self) -> list[tuple[str, str]]:
        """(staged name, published path) of each file the part has, relative to the output root."""
        files = []
        if self.embedded_rows:
            files.append((f"{self.part}.parquet", f"{PARTS}/{self.part}.parquet"))
        if self.error_rows:
            files.append((f"{self.part}.errors.parquet", f"{ERRORS}/{self.part}.parquet"))
        return files


@dataclass(frozen=True)
class FileFailure:
    """A shard that could not be read to its end: the rows before the failure are committed as usual."""

    url: str
    fingerprint: str
    rows_read: int
    reason: str
    message: str


@dataclass(frozen=True)
class ShardDone:
    """A shard read to its end."""

    url: str
    fingerprint: str
    rows: int


@dataclass
class OutputState:
    """What an output folder holds, read in a handful of listings."""

    commits: list[CommitRecord] = field(default_factory=list)
    shards_done: dict[str, ShardDone] = field(default_factory=dict)
    file_failures: dict[str, FileFailure] = field(default_factory=dict)
    published: set[str] = field(default_factory=set)
    """Relative paths of the files under parts/ and errors/."""
    staged: set[str] = field(default_factory=set)
    """Names of the files under _staging/."""
    leftovers: list[str] = field(default_factory=list)

    def committed_ranges(self) -> dict[str, list[Range]]:
        by_shard: dict[str, list[Range]] = {}
        for commit in self.commits:
            for url, ranges in commit.ranges.items():
                by_shard.setdefault(url, []).extend(ranges)
        return {url: merge_ranges(ranges) for url, ranges in by_shard.items()}

    def shard_complete(self, url: str, committed: dict[str, list[Range]] | None = None) -> bool:
        """Read to its end, and every one of its rows committed (pass committed_ranges() to reuse it)."""
        done = self.shards_done.get(url)
        if done is None:
            return False
        committed = self.committed_ranges() if committed is None else committed
        return committed.get(url, []) == ([(0, done.rows)] if done.rows else [])

    @property
    def committed_rows(self) -> int:
        return sum(c.rows for c in self.commits)

    @property
    def embedded_rows(self) -> int:
        return sum(c.embedded_rows for c in self.commits)

    def error_counts(self) -> dict[str, int]:
        """Dead-lettered rows by reason, plus one per failed file under 'file:<reason>'."""
        counts: dict[str, int] = {}
        for commit in self.commits:
            for reason, n in commit.error_counts.items():
                counts[reason] = counts.get(reason, 0) + n
        for failure in self.file_failures.values():
            counts[f"file:{failure.reason}"] = counts.get(f"file:{failure.reason}", 0) + 1
        return dict(sorted(counts.items()))

    def failed_part_way(self) -> list[FileFailure]:
        """Shards whose last read failed before their end (a later complete read supersedes a failure)."""
        return [f for url, f in sorted(self.file_failures.items()) if url not in self.shards_done]

    def unpublished(self, commit: CommitRecord) -> list[tuple[str, str]]:
        return [(staged, target) for staged, target in commit.files() if target not in self.published]


def read_state(fs: fsspec.AbstractFileSystem, root: str) -> OutputState:
    state = OutputState()
    commit_files = _list(fs, join(root, COMMITS), ".json")
    for _, raw in _cat_many(fs, commit_files):
        state.commits.append(CommitRecord.from_json(raw))
    for _, raw in _cat_many(fs, _list(fs, join(root, SHARDS), ".json")):
        data = json.loads(raw)
        state.shards_done[data["url"]] = ShardDone(data["url"], data["fingerprint"], data["rows"])
    for _, raw in _cat_many(fs, _list(fs, join(root, FAILED), ".json")):
        failure = FileFailure(**json.loads(raw))
        state.file_failures[failure.url] = failure
    for folder in (PARTS, ERRORS):
        state.published |= {f"{folder}/{_name(p)}" for p in _list(fs, join(root, folder), ".parquet")}
    for path in _list(fs, join(root, STAGING), ""):
        if path.endswith(".parquet"):
            state.staged.add(_name(path))
        else:
            state.leftovers.append(path)
    return state


def recover(fs: fsspec.AbstractFileSystem, root: str) -> OutputState:
    """Finish what a crashed run left: publish committed parts, delete uncommitted ones."""
    state = read_state(fs, root)
    committed_files = set()
    for commit in state.commits:
        committed_files |= {staged for staged, _ in commit.files()}
        for staged, target in state.unpublished(commit):
            if staged in state.staged:
                move(fs, join(root, STAGING, staged), join(root, target))
                state.published.add(target)
                log.info("published %s, committed by an interrupted run", target)
    uncommitted = sorted(state.staged - committed_files)
    for name in uncommitted:
        fs.rm(join(root, STAGING, name))
    for path in state.leftovers:
        fs.rm(path)
    if uncommitted or state.leftovers:
        log.info("removed %d uncommitted files left by an interrupted run", len(uncommitted) + len(state.leftovers))
    state.staged = set()
    state.leftovers = []
    return state


def dead_letter_example(fs: fsspec.AbstractFileSystem, root: str, state: OutputState) -> str | None:
    """'<reason>: <message> (<shard> row <row>)' for one dead letter of the commonest reason, or None."""
    counts = {reason: n for reason, n in state.error_counts().items() if not reason.startswith("file:")}
    if not counts:
        return None
    reason = max(counts, key=counts.get)
    commit = next(c for c in state.commits if c.error_counts.get(reason))
    errors = pq.read_table(fs.open(join(root, ERRORS, f"{commit.part}.parquet"), "rb"))
    row = next(r for r in errors.to_pylist() if r["reason"] == reason)
    return f"{reason}: {row['message']} ({row['shard']} row {row['row']})"


def write_shard_done(fs: fsspec.AbstractFileSystem, root: str, done: ShardDone) -> None:
    record = {"url": done.url, "fingerprint": done.fingerprint, "rows": done.rows}
    atomic_write(fs, join(root, SHARDS, f"{shard_key(done.url)}.json"), json.dumps(record).encode())
    failed = join(root, FAILED, f"{shard_key(done.url)}.json")
    if fs.exists(failed):  # an earlier run's failure, now read to its end
        fs.rm(failed)


def write_file_failure(fs: fsspec.AbstractFileSystem, root: str, failure: FileFailure) -> None:
    data = json.dumps(dataclasses.asdict(failure)).encode()
    atomic_write(fs, join(root, FAILED, f"{shard_key(failure.url)}.json"), data)


def _list(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> list[str]:
    # Never trust a cached listing: other processes commit while this one runs.
    fs.invalidate_cache(folder)
    try:
        return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(suffix))
    except FileNotFoundError:
        return []


def _cat_many(fs: fsspec.AbstractFileSystem, paths: list[str]):
    # One call, so object stores fetch the small records concurrently.
    if not paths:
        return []
    contents = fs.cat(paths, on_error="raise")
    return [(p, contents[p]) for p in paths]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]
