"""The output folder's commit protocol: what is committed is exactly what the commit records say.

Layout under the output root:

    _neobert_run.json          run record: model, settings, inputs by generation (written first)
    _staging/<part>.parquet    a part written but maybe not committed yet
    _commits/<part>.json       commit record: the part's rows as (shard, row ranges); THE commit point
    parts/<part>.parquet       committed data, published after its commit record
    _shards/<key>.json         a shard read to its end: its URL, fingerprint and row count

A part is written to _staging (atomically), then its commit record, then it is moved to parts/.
A crash before the commit record leaves an uncommitted part that the next run deletes; a crash
after it leaves a committed part that the next run publishes. Part names are a hash of the rows
they hold, so a retried write of the same rows replaces itself instead of duplicating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field

import fsspec

from pipeline.io.ranges import Range, merge_ranges

log = logging.getLogger(__name__)

RUN_RECORD = "_neobert_run.json"
STAGING = "_staging"
COMMITS = "_commits"
PARTS = "parts"
SHARDS = "_shards"


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
    """One committed part and exactly which input rows it holds."""

    part: str
    rows: int
    ranges: dict[str, list[Range]]
    generation: int

    def to_json(self) -> bytes:
        return json.dumps(
            {"part": self.part, "rows": self.rows, "generation": self.generation, "ranges": self.ranges}
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CommitRecord:
        data = json.loads(raw)
        ranges = {url: [tuple(r) for r in rs] for url, rs in data["ranges"].items()}
        return cls(data["part"], data["rows"], ranges, data["generation"])


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
    published: set[str] = field(default_factory=set)
    staged: set[str] = field(default_factory=set)
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


def read_state(fs: fsspec.AbstractFileSystem, root: str) -> OutputState:
    state = OutputState()
    commit_files = _list(fs, join(root, COMMITS), ".json")
    for _, raw in _cat_many(fs, commit_files):
        state.commits.append(CommitRecord.from_json(raw))
    for _, raw in _cat_many(fs, _list(fs, join(root, SHARDS), ".json")):
        data = json.loads(raw)
        state.shards_done[data["url"]] = ShardDone(data["url"], data["fingerprint"], data["rows"])
    state.published = {_stem(p) for p in _list(fs, join(root, PARTS), ".parquet")}
    for path in _list(fs, join(root, STAGING), ""):
        if path.endswith(".parquet"):
            state.staged.add(_stem(path))
        else:
            state.leftovers.append(path)
    return state


def recover(fs: fsspec.AbstractFileSystem, root: str) -> OutputState:
    """Finish what a crashed run left: publish committed parts, delete uncommitted ones."""
    state = read_state(fs, root)
    committed = {c.part for c in state.commits}
    for part in sorted(committed - state.published):
        if part in state.staged:
            move(fs, join(root, STAGING, f"{part}.parquet"), join(root, PARTS, f"{part}.parquet"))
            state.published.add(part)
            log.info("published %s, committed by an interrupted run", part)
    uncommitted = sorted(state.staged - committed)
    for part in uncommitted:
        fs.rm(join(root, STAGING, f"{part}.parquet"))
    for path in state.leftovers:
        fs.rm(path)
    if uncommitted or state.leftovers:
        log.info("removed %d uncommitted parts left by an interrupted run", len(uncommitted) + len(state.leftovers))
    state.staged = set()
    state.leftovers = []
    return state


def write_shard_done(fs: fsspec.AbstractFileSystem, root: str, done: ShardDone) -> None:
    record = {"url": done.url, "fingerprint": done.fingerprint, "rows": done.rows}
    atomic_write(fs, join(root, SHARDS, f"{shard_key(done.url)}.json"), json.dumps(record).encode())


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


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".parquet")
