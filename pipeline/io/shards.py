"""Discover input shards and fingerprint them (size + ETag/mtime, or a hash of the bytes) so runs can tell
what changed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from sys import intern  # shared with the manifest's maps: one copy per shard

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import NoInputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")


@dataclass(frozen=True, slots=True)  # one per shard: a million of them on the driver
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
    """size + ETag when the store has one (S3, GCS, Azure; the git blob id on the Hugging Face Hub, a hash
    of the contents), else size + modification time."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("blob_id")
    if etag:
        return f"size={size};etag={str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "isoformat"):
        mtime = mtime.isoformat()
    return f"size={size};mtime={mtime}"


def content_fingerprint(fs: fsspec.AbstractFileSystem, path: str, size: int) -> str:
    """size + SHA-256 of the bytes: catches an edit that keeps size and mtime, at the cost of a full read."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return f"size={size};sha256={digest.hexdigest()}"


def fingerprint(fs: fsspec.AbstractFileSystem, path: str, info: dict, mode: str = "store") -> str:
    """The shard's fingerprint: what the store says of it ('store'), or a hash of its bytes ('content')."""
    return content_fingerprint(fs, path, info.get("size")) if mode == "content" else shard_fingerprint(info)


def discover_shards(
    fs: fsspec.AbstractFileSystem, path: str, requested_format: str = "auto", fingerprint_mode: str = "store"
) -> list[Shard]:
    """All readable shards under a folder, matching a glob, or the one file named; sorted by path.

    A folder, given or matched by a glob, is searched inside, whatever its name.
    """
    if any(ch in path for ch in "*?["):
        matches = fs.glob(path, detail=True)
        listed = (entry for name, info in matches.items() for entry in _files(fs, name, info))
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        listed = _files(fs, path, {"type": "directory"})
        root = path.rstrip("/")
    elif fs.exists(path):
        listed = iter([(path, fs.info(path))])
        root = path.rsplit("/", 1)[0]
    else:
        raise NoInputError(f"input {fs.unstrip_protocol(path)} does not exist; check the path and its credentials")
    found = []  # (name, size, format, fingerprint or None): no listing dict outlives its folder
    for name, info in listed:
        if info.get("type") == "directory" or name.rsplit("/", 1)[-1].startswith(("_", ".")):
            continue
        fmt = shard_format(name, requested_format)
        if fmt is not None:
            print_ = None if fingerprint_mode == "content" else shard_fingerprint(info)
            found.append((name, int(info.get("size") or 0), fmt, print_))
    _forget_listings(fs, root)
    if not found:
        raise NoInputError(
            f"no .jsonl[.gz|.zst], .parquet or .txt shards found at {fs.unstrip_protocol(path)}; "
            "check the path, or set --format for other extensions"
        )
    found.sort()
    found = [entry for i, entry in enumerate(found) if i == 0 or entry[0] != found[i - 1][0]]  # a glob may match twice
    if fingerprint_mode == "content":
        with ThreadPoolExecutor(max_workers=8) as pool:  # reading and hashing release the GIL
            prints = list(pool.map(lambda entry: content_fingerprint(fs, entry[0], entry[1]), found))
        found = [(name, size, fmt, print_) for (name, size, fmt, _), print_ in zip(found, prints, strict=True)]
    return [
        Shard(
            url=intern(fs.unstrip_protocol(name)),
            relative_path=name[len(root) :].lstrip("/") if name.startswith(root) else name,
            format=fmt,
            size_bytes=size,
            fingerprint=intern(print_),
        )
        for name, size, fmt, print_ in found
    ]


def _files(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> Iterator[tuple[str, dict]]:
    """(name, info) of `path` itself, or of every file below it.

    An object store is listed in one recursive listing (a request per 1,000 objects, where a folder at
    a time would be a request per folder); discover_shards empties the listing cache it fills, or the
    driver would hold every object's info for the whole run. A local folder is walked a folder at a
    time, so that only one folder's info dicts are alive at once.
    """
    if info.get("type") != "directory":
        yield path, info
    elif isinstance(fs, LocalFileSystem):
        for _, _, files in fs.walk(path, detail=True):
            for file_info in files.values():
                yield file_info["name"], file_info
    else:
        yield from fs.find(path, detail=True).items()


def _forget_listings(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Empty fsspec's listing cache at and below root (a glob's listing, a folder's find)."""
    below = root.rstrip("/") + "/"
    for cached in [key for key in fs.dircache if key.startswith(below)]:
        fs.dircache.pop(cached, None)
    fs.invalidate_cache(root)  # root itself and its parents
