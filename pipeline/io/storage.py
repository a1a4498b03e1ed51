"""One place that turns a URL into an fsspec filesystem with the job's storage settings."""

from __future__ import annotations

import fsspec
import pyarrow.fs

from pipeline.config import StorageConfig


def filesystem_for(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URL."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url, **storage.fsspec_options(protocol))
    except ImportError as err:
        raise RuntimeError(
            f"reading {protocol}:// needs an extra package ({err}); e.g. pip install 'neobert-pipeline[gcs]'"
        ) from err


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside fs written back as a URL another process can open."""
    return fs.unstrip_protocol(path)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Wrap an fsspec filesystem for writers that speak pyarrow."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
