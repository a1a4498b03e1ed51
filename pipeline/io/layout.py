"""The output folder's layout, and the few storage operations its protocol is built from.

_neobert_run.json          run record: model, settings, inputs by generation (written first)
_lease/<token>.json        who holds the writer lease, created once per holder (lease.py)
_staging/<part>.parquet    a part written but maybe not committed yet
_commits/<part>.json       commit record: the part's rows as (shard, row ranges); THE commit point
parts/<part>.parquet       committed embeddings, published after its commit record
errors/<part>.parquet      the same part's dead letters: rows that could not be embedded, and why
_reads/<id>.json           one read task's shards: read to their end (URL, fingerprint, rows), or
                           failed part way (corrupt, denied, vanished: rows read, reason)
_checkpoint/<seq>.parquet  the commit and read records above compacted into one file (compaction.py); the
                           newest counts, those it replaced stay ten minutes for their readers
_inputs/<generation>.parquet  a generation's input shards: URL, format, size, fingerprint
_todo/<generation>.parquet    the shards a run reads for a generation, for its read tasks (todo.py);
                              ids-<pass>.parquet, those a --duplicate-ids pass reads the ids of
_quarantine/               what recover or repair took out of the output: never read, kept for a look
_vacuum.json               the parts an interrupted vacuum was deleting (vacuum.py)
duplicates/                with duplicate_ids flag/reject: listing-<input>/, every repeat of an id and
                           where its first is, as Parquet files; _done.json naming the listing and the
                           input it was found in; _ids/, every id with its shard and row (duplicate_ids.py)

Outputs of manifest version 1 kept one _shards/<key>.json per shard read and _failed/<key>.json per shard
failed: they are still read, and the first compaction folds them into a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import datetime

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import AZURE_PROTOCOLS
from pipeline.io.ranges import Range

RUN_RECORD = "_neobert_run.json"
LEASE = "_lease"
STAGING = "_staging"
COMMITS = "_commits"
PARTS = "parts"
ERRORS = "errors"
READS = "_reads"
CHECKPOINTS = "_checkpoint"
INPUTS = "_inputs"
TODO = "_todo"
SHARDS = "_shards"  # manifest version 1
FAILED = "_failed"  # manifest version 1
QUARANTINE = "_quarantine"
DUPLICATES = "duplicates"
VACUUM = "_vacuum.json"


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or nothing: object stores put atomically; local files are renamed."""
    if is_local(fs):
        tmp = _hidden_temporary(fs, path)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _hidden_temporary(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A name beside path for writing it first: hidden (listing() skips it), so a crash leaves no file
    that any reader or recovery takes for part of the output."""
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    return f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write path only if nothing is there (FileExistsError otherwise), whole or not at all.

    S3 and Azure do it with a conditional PUT (If-None-Match: *), GCS with ifGenerationMatch=0; a local
    file is written aside and then hard-linked into place, which fails if the name exists.
    """
    if is_local(fs):
        tmp = _hidden_temporary(fs, path)
        fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
    else:
        fs.pipe_file(path, data, mode="create")


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """A whole Parquet file in memory (zstd), for atomic_write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Rename locally (atomic); server-side copy then delete on object stores (the copy is atomic).

    Object stores get the copy and delete spelled out: gcsfs's mv first tries GCS's moveTo, which not
    every GCS-compatible server has, and retries it with backoff for half a minute before copying.
    """
    if is_local(fs):
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(source, target)
        return
    fs.copy(source, target)
    if _is_azure(fs):
        _wait_for_azure_copy(fs, target)
    fs.rm_file(source)


AZURE_COPY_TIMEOUT_S = 600.0


def _is_azure(fs: fsspec.AbstractFileSystem) -> bool:
    return speaks(fs, AZURE_PROTOCOLS)


def _wait_for_azure_copy(fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Azure's Copy Blob, which adlfs's copy starts, may still be running when it returns; the source must
    outlive it. A copy that failed or was aborted raises, and the source stays for the next try."""
    deadline = time.monotonic() + AZURE_COPY_TIMEOUT_S
    while (status := azure_copy_status(fs, target)) == "pending":
        if time.monotonic() > deadline:
            raise TimeoutError(f"Azure is still copying to {target} after {AZURE_COPY_TIMEOUT_S:.0f}s")
        time.sleep(0.2)
    if status not in (None, "success"):
        raise OSError(f"Azure could not copy to {target}: copy {status}")


def azure_copy_status(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The state of the last Copy Blob into path ('pending', 'success', 'aborted', 'failed'), None if none."""

    async def status() -> str | None:
        container, blob, _ = fs.split_path(path)
        async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
            properties = await client.get_blob_properties()
        copy_status = properties.copy.status if properties.copy else None
        return getattr(copy_status, "value", copy_status)

    return fsspec.asyn.sync(fs.loop, status)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return speaks(fs, ("file", "local"))


def speaks(fs: fsspec.AbstractFileSystem, protocols: tuple[str, ...]) -> bool:
    """Whether fs is the filesystem of any of these protocols (fsspec gives one name or a tuple of them)."""
    own = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in protocols for p in own)


def part_name(shard_rows: dict[str, list[Range]], generation: int = 0) -> str:
    """Deterministic name from the rows a part holds, and their generation: a rewritten shard's rows
    are other rows, in another part."""
    rows = sorted(shard_rows.items())
    digest = hashlib.sha256(json.dumps([generation, rows] if generation else rows).encode()).hexdigest()
    return f"part-{digest[:32]}"


def listing(fs: fsspec.AbstractFileSystem, folder: str, suffix: str = "") -> dict[str, float]:
    """The files in folder ending in suffix, with the store's own modification time of each (seconds).

    Never a cached listing: other processes commit while this one runs. Times come from the store's
    clock (S3's LastModified, to the second; a local file's mtime), so they order writes by one clock.
    Hidden names (a local write in progress) are left out.
    """
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {
        entry["name"]: modified_s(entry)
        for entry in entries
        if entry.get("type") != "directory"
        and entry["name"].endswith(suffix)
        and not name_of(entry["name"]).startswith(".")
    }


def exists_now(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether path exists, asked of the store, not of a listing this process cached earlier."""
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return fs.exists(path)


def modified_s(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value or 0.0)


def cat_many(fs: fsspec.AbstractFileSystem, paths: list[str], *, missing_ok: bool = False) -> list[tuple[str, bytes]]:
    """(path, contents) of small files, fetched in one call (concurrently on object stores); with
    missing_ok, files gone since they were listed are left out."""
    if not paths:
        return []
    contents = fs.cat(sorted(paths), on_error="omit" if missing_ok else "raise")
    return [(p, contents[p]) for p in sorted(paths) if p in contents]


def remove_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete files, in batches on object stores; one already gone is no error."""
    if not paths:
        return
    if not is_local(fs):
        try:
            fs.rm(list(paths))
        except FileNotFoundError:  # gcsfs, when none of them was there any more
            pass
        return
    for path in paths:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def url_column(urls: list[str]) -> pa.Array:
    """URLs as a binary column: a file name that is not UTF-8 (kept in a str by surrogateescape, as
    Python lists it) survives the round trip, which an Arrow string cannot hold."""
    return pa.array([None if u is None else u.encode("utf-8", "surrogateescape") for u in urls], pa.binary())


def urls_of(column) -> list[str]:
    """url_column, back to the URLs."""
    return [None if b is None else b.decode("utf-8", "surrogateescape") for b in column.to_pylist()]


def url_texts(urls: pa.ChunkedArray | pa.Array) -> pa.Array:
    """URLs (url_column) as text, the form the shard column of parts/, errors/ and duplicates/ holds,
    without a Python string per URL when all are UTF-8 (as they are but for a name no read can open)."""
    try:
        return pc.cast(urls, pa.string())
    except pa.ArrowInvalid:
        return pa.array([url_text(url) for url in urls_of(urls)], pa.string())


def url_text(url: str) -> str:
    # A name that is not UTF-8 never has rows (it fails as invalid_file_name), so its text form only
    # has to be readable.
    return url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def with_every_column(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """table with schema's columns, in its order and types; the ones table lacks all null (a table of
    rows of several kinds, each kind with only its own columns)."""
    columns = {
        f.name: table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    }
    return pa.table(columns, schema=schema)


def name_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]
