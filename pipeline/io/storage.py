"""One place that turns a URL into an fsspec filesystem with the job's storage settings."""

from __future__ import annotations

import sys

import fsspec
import pyarrow.fs

from pipeline.config import StorageConfig


def filesystem_for(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URL."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    forget_interrupted_imports()
    try:
        return fsspec.core.url_to_fs(url, **storage.fsspec_options(protocol))
    except ImportError as err:
        raise RuntimeError(
            f"reading {protocol}:// needs an extra package ({err}); e.g. pip install 'neobert-pipeline[gcs]'"
        ) from err


def forget_interrupted_imports() -> None:
    """Drop modules that an interrupted import left behind without their package.

    When a dataset fails, Ray Data cancels its running tasks by raising KeyboardInterrupt in them,
    and the worker process lives on for the driver's next job. A task stopped while importing s3fs
    leaves aiohttp's finished submodules in sys.modules but not aiohttp itself; every later import
    in that process then fails ("module aiohttp has no attribute http_exceptions"). Forgetting the
    orphans lets the next import run from the start.
    """
    while orphans := [name for name in list(sys.modules) if "." in name and name.rpartition(".")[0] not in sys.modules]:
        # A package's orphaned subpackage has orphans of its own: repeat until none is left.
        for name in orphans:
            sys.modules.pop(name, None)


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside fs written back as a URL another process can open."""
    return fs.unstrip_protocol(path)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Wrap an fsspec filesystem for writers that speak pyarrow."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
