"""Discover input shards and fingerprint them (size + ETag/mtime, or a hash of the bytes) so runs can tell
what changed."""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate
from s3fs import S3FileSystem

from pipeline.config import AZURE_PROTOCOLS, GCS_PROTOCOLS
from pipeline.errors import NoInputError
from pipeline.io.layout import speaks, url_column, urls_of

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")


@dataclass(frozen=True, slots=True)  # made from a ShardListing as needed
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


LISTING_SCHEMA = pa.schema(
    [
        ("url", pa.binary()),  # layout.url_column: exact, even for a file name that is not UTF-8
        ("relative_path", pa.binary()),
        ("format", pa.string()),
        ("size_bytes", pa.int64()),
        ("fingerprint", pa.string()),
    ]
)
LISTING_CHUNK = 8_192  # entries gathered in Python before they become columns
S3_PAGE_KEYS = 1_000  # S3's most per listing request
GCS_PAGE_OBJECTS = 1_000  # what gcsfs's own listing asks for per request
AZURE_PAGE_BLOBS = 1_000


class ShardListing(Sequence):
    """The shards a listing found, sorted by URL, kept as columns (LISTING_SCHEMA): a Shard is made
    when one is asked for. As objects, the listing took the driver's heap about 520 B per shard
    (tracemalloc, 10^5 shards); as columns 116 B; discover_shards' own are a memory-mapped file, off
    the heap (benchmarks/RESULTS.md). A subset taken of it is a copy on the heap."""

    __slots__ = ("table",)

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardListing(self.table.take(pa.array(range(len(self))[i], pa.int64())))
        if not -len(self) <= i < len(self):
            raise IndexError(f"shard {i} of a listing of {len(self)}")
        return _shards(self.table.slice(i % len(self), 1))[0]

    def __iter__(self) -> Iterator[Shard]:
        for batch in self.table.to_batches(max_chunksize=4_096):
            yield from _shards(batch)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardListing):
            return self.table.equals(other.table)
        return isinstance(other, Sequence) and list(self) == list(other)

    def __add__(self, other: ShardListing) -> ShardListing:
        return ShardListing(pa.concat_tables([self.table, other.table]))

    def take(self, indices) -> ShardListing:
        """The shards at these positions, in a listing of their own (a copy: it pickles small), taken
        chunk by chunk: Arrow's take over a chunked table joins all its chunks first, which copied a
        10^6-shard listing whole onto the heap to take a few shards (or none) of it."""
        indices = np.asarray(indices, dtype=np.int64)
        order = None if np.all(indices[1:] >= indices[:-1]) else np.argsort(indices, kind="stable")
        ordered = indices if order is None else indices[order]
        if len(ordered) and (ordered[0] < 0 or ordered[-1] >= len(self)):
            raise IndexError(f"shards {ordered[0]}..{ordered[-1]} of a listing of {len(self)}")
        pieces, offset = [], 0
        for chunk in self.table.to_batches():
            low, high = np.searchsorted(ordered, [offset, offset + chunk.num_rows])
            if high > low:
                pieces.append(chunk.take(pa.array(ordered[low:high] - offset)))
            offset += chunk.num_rows
        table = pa.Table.from_batches(pieces, schema=self.table.schema)
        return ShardListing(table if order is None else table.take(pa.array(np.argsort(order))))

    def run_of(self, start: int, stop: int) -> ShardListing:
        """The shards from start to stop, a copy (take): a slice alone would pickle the whole listing's
        buffers into a read task."""
        return self.take(np.arange(start, stop))

    @classmethod
    def of(cls, shards: Iterable[Shard]) -> ShardListing:
        """A listing of these shards, in their order."""
        rows = [(s.url, s.relative_path, s.format, s.size_bytes, s.fingerprint) for s in shards]
        urls, relative, formats, sizes, prints = (list(c) for c in zip(*rows, strict=True)) if rows else [[]] * 5
        return ShardListing(_columns(urls, relative, formats, sizes, prints))

    def sizes(self) -> np.ndarray:
        """Each shard's bytes, in the listing's order."""
        return self.table.column("size_bytes").to_numpy()

    @property
    def size_bytes(self) -> int:
        """The listed shards' bytes together."""
        return pc.sum(self.table.column("size_bytes")).as_py() or 0

    def urls(self) -> list[str]:
        return urls_of(self.table.column("url"))


def _shards(table: pa.Table | pa.RecordBatch) -> list[Shard]:
    columns = (
        urls_of(table.column("url")),
        urls_of(table.column("relative_path")),
        table.column("format").to_pylist(),
        table.column("size_bytes").to_pylist(),
        table.column("fingerprint").to_pylist(),
    )
    return [Shard(*fields) for fields in zip(*columns, strict=True)]


def discover_shards(
    fs: fsspec.AbstractFileSystem, path: str, requested_format: str = "auto", fingerprint_mode: str = "store"
) -> ShardListing:
    """All readable shards under a folder, matching a glob, or the one file named; sorted by URL.

    A folder, given or matched by a glob, is searched inside, whatever its name.
    """
    if any(ch in path for ch in "*?["):
        listed = _matched_files(fs, path)
        root = _before_wildcard(path).rsplit("/", 1)[0]
    elif fs.isdir(path):
        listed = _files(fs, path, {"type": "directory"})
        root = path.rstrip("/")
    elif fs.exists(path):
        listed = iter([(path, fs.info(path))])
        root = path.rsplit("/", 1)[0]
    else:
        raise NoInputError(f"input {fs.unstrip_protocol(path)} does not exist; check the path and its credentials")
    table = _mapped(_listing_chunks(fs, listed, root, requested_format, fingerprint_mode))
    _forget_listings(fs, root)
    if not table.num_rows:
        raise NoInputError(
            f"no .jsonl[.gz|.zst], .parquet or .txt shards found at {fs.unstrip_protocol(path)}; "
            "check the path, or set --format for other extensions"
        )
    urls = table.column("url")
    if not pc.all(pc.greater_equal(urls.slice(1), urls.slice(0, len(urls) - 1))).as_py():  # often listed sorted
        table = table.take(pc.sort_indices(urls))
        urls = table.column("url")
    repeated = pc.equal(urls.slice(1), urls.slice(0, len(urls) - 1))  # a glob may match a file twice
    if pc.any(repeated).as_py():
        table = table.filter(pa.concat_arrays([pa.array([True]), pc.invert(repeated).combine_chunks()]))
    return ShardListing(table)


def _listing_chunks(
    fs: fsspec.AbstractFileSystem,
    listed: Iterator[tuple[str, dict]],
    root: str,
    requested_format: str,
    fingerprint_mode: str,
) -> Iterator[pa.Table]:
    """The readable shards among the listed files, as columns (LISTING_SCHEMA), LISTING_CHUNK at a time."""
    found = []  # one chunk's (path, URL, relative path, format, size, fingerprint)
    for name, info in listed:
        if info.get("type") == "directory" or name.rsplit("/", 1)[-1].startswith(("_", ".")):
            continue
        fmt = shard_format(name, requested_format)
        if fmt is not None:
            relative = name[len(root) :].lstrip("/") if name.startswith(root) else name
            print_ = None if fingerprint_mode == "content" else shard_fingerprint(info)
            found.append((name, fs.unstrip_protocol(name), relative, fmt, int(info.get("size") or 0), print_))
        if len(found) == LISTING_CHUNK:
            yield _listing_table(fs, found, fingerprint_mode)
            found = []
    yield _listing_table(fs, found, fingerprint_mode)


def _mapped(chunks: Iterable[pa.Table]) -> pa.Table:
    """The chunks as one table whose columns are a memory-mapped file on this machine's disk, not the
    heap (as Hugging Face datasets keeps Arrow tables): the kernel holds its pages as a file's cache,
    dropped under memory pressure and read again when needed (10^6 shards: 120 MB). The file is
    unlinked as soon as it is mapped, so nothing is left behind, even by a crash."""
    with tempfile.NamedTemporaryFile(prefix="neobert-listing-", suffix=".arrow") as spool:
        with pa.ipc.new_file(spool.name, LISTING_SCHEMA) as writer:
            for chunk in chunks:
                writer.write_table(chunk)
        return pa.ipc.open_file(pa.memory_map(spool.name)).read_all()


def _listing_table(fs: fsspec.AbstractFileSystem, found: list[tuple], fingerprint_mode: str) -> pa.Table:
    """Listed shards as columns (LISTING_SCHEMA), their contents hashed here with fingerprint_mode content."""
    paths, urls, relative, formats, sizes, prints = (list(c) for c in zip(*found, strict=True)) if found else [[]] * 6
    if fingerprint_mode == "content":
        with ThreadPoolExecutor(max_workers=8) as pool:  # reading and hashing release the GIL
            prints = list(pool.map(content_fingerprint, [fs] * len(paths), paths, sizes))
    return _columns(urls, relative, formats, sizes, prints)


def _columns(urls: list, relative: list, formats: list, sizes: list, prints: list) -> pa.Table:
    return pa.table(
        {
            "url": url_column(urls),
            "relative_path": url_column(relative),
            "format": pa.array(formats, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "fingerprint": pa.array(prints, pa.string()),
        },
        schema=LISTING_SCHEMA,
    )


def _files(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> Iterator[tuple[str, dict]]:
    """(name, info) of `path` itself, or of every file below it.

    An object store is listed in one recursive listing (a request per 1,000 objects, where a folder at
    a time would be a request per folder), a page at a time on S3, GCS and Azure (_objects_in_pages):
    fsspec's `find` gathers every object's info dict first, about 1 KB each, and fills a listing cache
    that discover_shards empties, or the driver would hold them for the whole run; it lists any other
    store (and a version-aware one). A local folder is walked a folder at a time, so that only one
    folder's info dicts are alive at once.
    """
    if info.get("type") != "directory":
        yield path, info
    elif _pager(fs):
        yield from _objects_in_pages(fs, path)
    elif isinstance(fs, LocalFileSystem):
        for _, folders, files in fs.walk(path, detail=True):
            # In the order of their paths' bytes (a folder's name with its "/"): files kept in leaf
            # folders are then listed sorted by URL, and discover_shards need not sort them again.
            for name in sorted(folders, key=lambda name: _utf8(name) + b"/"):
                folders[name] = folders.pop(name)  # walk descends in the folders' order
            for name in sorted(files, key=_utf8):
                yield files[name]["name"], files[name]
    else:
        yield from fs.find(path, detail=True).items()


def _matched_files(fs: fsspec.AbstractFileSystem, pattern: str) -> Iterator[tuple[str, dict]]:
    """(name, info) of every file a glob matches, or that is below a folder it matches. On S3, GCS and
    Azure, from a listing a page at a time of the keys the glob's fixed start names, matched here as
    fsspec's glob matches (fsspec.utils.glob_translate); elsewhere, fsspec's glob and a search in each
    folder."""
    fixed = _before_wildcard(pattern)
    if not (_pager(fs) and "/" in fixed):
        for name, info in fs.glob(pattern, detail=True).items():
            yield from _files(fs, name, info)
        return
    root, stem = fixed.rsplit("/", 1)
    # A folder is matched with a "/" after its name when the glob ends in one or in "/**", as fsspec does.
    folder_end = "/" if pattern.endswith(("/", "/**")) else ""
    matches = re.compile(glob_translate(pattern.rstrip("/") + ("/" if pattern.endswith("/") else ""))).match
    for name, info in _objects_in_pages(fs, root, stem):
        below = name[len(root) + 1 :].split("/")
        folders = (f"{root}/{'/'.join(below[:depth])}{folder_end}" for depth in range(1, len(below)))
        if matches(name) or any(matches(folder) for folder in folders):
            yield name, info


def _before_wildcard(pattern: str) -> str:
    """A glob's fixed start: everything before its first wildcard."""
    return pattern[: min(pattern.find(ch) for ch in "*?[" if ch in pattern)]


def _pager(fs: fsspec.AbstractFileSystem):
    """The function that lists a page of this store's objects (_objects_in_pages), or None where
    fsspec's find lists it: another store, or a version-aware one."""
    if getattr(fs, "version_aware", False):
        return None
    if isinstance(fs, S3FileSystem):
        return _s3_page
    if speaks(fs, GCS_PROTOCOLS):
        return _gcs_page
    return _azure_page if speaks(fs, AZURE_PROTOCOLS) else None


def _objects_in_pages(fs: fsspec.AbstractFileSystem, path: str, stem: str = "") -> Iterator[tuple[str, dict]]:
    """(name, info) of every object below path (whose name there starts with stem), a page at a time
    (one request each, retried as the store's library retries any), the info of each as the library's
    own listing gives it, so the fingerprints are the same. In the order the store lists names: by
    their UTF-8 bytes, the listing's order."""
    bucket, key, _ = fs.split_path(path)
    prefix = (key.rstrip("/") + "/" if key else "") + stem
    page_of = _pager(fs)
    token = None
    while True:
        infos, token = page_of(fs, bucket, prefix, token)
        for info in infos:
            yield info["name"], info
        if token is None:
            return


def _s3_page(fs: S3FileSystem, bucket: str, prefix: str, token: str | None) -> tuple[list[dict], str | None]:
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_KEYS}
    page = fs.call_s3("list_objects_v2", **request, **({"ContinuationToken": token} if token else {}))
    infos = [
        # The fields shard_fingerprint reads, as s3fs's own listing names them.
        {"name": f"{bucket}/{entry['Key']}", "type": "file", "size": entry["Size"]}
        | {"ETag": entry.get("ETag"), "LastModified": entry.get("LastModified")}
        for entry in page.get("Contents", [])
    ]
    return infos, page["NextContinuationToken"] if page.get("IsTruncated") else None


def _gcs_page(fs, bucket: str, prefix: str, token: str | None) -> tuple[list[dict], str | None]:
    """A page of GCS's objects.list, as gcsfs's find asks for them (no delimiter: every object below)."""
    request = {"maxResults": GCS_PAGE_OBJECTS} | ({"prefix": prefix} if prefix else {})
    page = fs.call("GET", "b/{}/o", bucket, json_out=True, **request, **({"pageToken": token} if token else {}))
    return [fs._process_object(bucket, item) for item in page.get("items", [])], page.get("nextPageToken")


def _azure_page(fs, container: str, prefix: str, token: str | None) -> tuple[list[dict], str | None]:
    """A page of Azure's List Blobs, as adlfs's find asks for them and turns them into info dicts."""
    return fsspec.asyn.sync(fs.loop, _azure_page_async, fs, container, prefix, token)


async def _azure_page_async(fs, container: str, prefix: str, token: str | None) -> tuple[list[dict], str | None]:
    async with fs.service_client.get_container_client(container=container) as client:
        listing = client.list_blobs(
            include=["metadata"], name_starts_with=prefix or None, results_per_page=AZURE_PAGE_BLOBS
        )
        pages = listing.by_page(continuation_token=token)
        try:
            page = await pages.__anext__()
        except StopAsyncIteration:
            return [], None
        infos = await fs._details([blob async for blob in page])
    return [i for i in infos if i["type"] == "file"], pages.continuation_token or None


def _utf8(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _forget_listings(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Empty fsspec's listing cache at and below root (a glob's listing, a folder's find)."""
    below = root.rstrip("/") + "/"
    for cached in [key for key in fs.dircache if key.startswith(below)]:
        fs.dircache.pop(cached, None)
    fs.invalidate_cache(root)  # root itself and its parents
