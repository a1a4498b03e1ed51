"""Discover input shards and fingerprint them (size + ETag/mtime) so runs can tell what changed."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from pipeline.errors import NoInputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")


@dataclass(frozen=True)
class Shard:
    """One input file: where it is, how to read it, and what it looked like when listed."""

    url: str
    """Full URL (protocol included) that a worker on any node opens."""
    relative_path: str
    """Path below the input root; part of derived ids, so ids survive moving the root."""
    format: str
    size_bytes: int
    fingerprint: str


def shard_format(path: str, requested: str) -> str | None:
    """jsonl, parquet or text by extension (after a compression suffix), or the requested format."""
    if requested != "auto":
        return requested
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def shard_fingerprint(info: dict) -> str:
    """size + ETag when the store has one (S3, GCS), else size + modification time."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"size={size};etag={str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "isoformat"):
        mtime = mtime.isoformat()
    return f"size={size};mtime={mtime}"


def discover_shards(fs: fsspec.AbstractFileSystem, path: str, requested_format: str = "auto") -> list[Shard]:
    """All readable shards under a folder, matching a glob, or the one file named; sorted by path."""
    if any(ch in path for ch in "*?["):
        infos = fs.glob(path, detail=True)
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        root = path.rstrip("/")
    elif fs.exists(path):
        infos = {path: fs.info(path)}
        root = path.rsplit("/", 1)[0]
    else:
        raise NoInputError(f"input {fs.unstrip_protocol(path)} does not exist; check the path and its credentials")
    shards = []
    for name, info in sorted(infos.items()):
        if info.get("type") == "directory" or name.rsplit("/", 1)[-1].startswith(("_", ".")):
            continue
        fmt = shard_format(name, requested_format)
        if fmt is None:
            continue
        shards.append(
            Shard(
                url=fs.unstrip_protocol(name),
                relative_path=name[len(root) :].lstrip("/") if name.startswith(root) else name,
                format=fmt,
                size_bytes=int(info.get("size") or 0),
                fingerprint=shard_fingerprint(info),
            )
        )
    if not shards:
        raise NoInputError(
            f"no .jsonl[.gz|.zst], .parquet or .txt shards found at {fs.unstrip_protocol(path)}; "
            "check the path, or set --format for other extensions"
        )
    return shards
