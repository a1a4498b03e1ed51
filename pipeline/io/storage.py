"""One place that turns a URL into an fsspec filesystem with the job's storage settings."""

from __future__ import annotations

import logging
import sys

import fsspec
from fsspec.registry import registry as imported_filesystems  # protocol -> class, once its library is imported

from pipeline.config import AZURE_PROTOCOLS, GCS_PROTOCOLS, StorageConfig
from pipeline.errors import AZURE_CREDENTIALS, SettingsError, StorageAccessError

# The optional install that brings each store's library.
EXTRAS = {**dict.fromkeys(GCS_PROTOCOLS, "gcs"), **dict.fromkeys(AZURE_PROTOCOLS, "azure")}
# Loggers that report every request at INFO, which would drown the job's own log; kept at WARNING
# unless the user set a level for them.
CHATTY_LOGGERS = (
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.identity",
    "fsspec.caching",
    "httpx",
    "httpx2",
)


def filesystem_for(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URL."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in imported_filesystems:  # its library is about to be imported in this process
        forget_interrupted_imports()
        quiet_chatty_loggers()
    try:
        return fsspec.core.url_to_fs(url, **storage.fsspec_options(protocol))
    except ImportError as err:
        extra = EXTRAS.get(protocol)
        install = f"pip install 'neobert-pipeline[{extra}]'" if extra else "install the fsspec library for it"
        raise SettingsError(f"{protocol}:// needs a package that is not installed ({err}): {install}") from err
    except ValueError as err:
        if protocol in AZURE_PROTOCOLS:  # adlfs found no account to connect to
            message = f"no usable Azure Blob credentials for {url} ({err}); {AZURE_CREDENTIALS}"
            raise StorageAccessError(message) from err
        raise


def quiet_chatty_loggers() -> None:
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def forget_interrupted_imports() -> list[str]:
    """Drop modules that an interrupted import left behind without their package; returns their names.

    When a dataset fails, Ray Data cancels its running tasks by raising KeyboardInterrupt in them,
    and the worker process lives on for the driver's next job. A task stopped while importing s3fs
    leaves aiohttp's finished submodules in sys.modules but not aiohttp itself; the next import makes
    a new aiohttp around those old submodules and fails ("module aiohttp has no attribute
    http_exceptions"). Forgetting the orphans first lets it start clean. It must run before that
    import, not after it fails: by then the orphans have a parent again and look like any module.
    """
    forgotten = []
    while orphans := [name for name in list(sys.modules) if "." in name and name.rpartition(".")[0] not in sys.modules]:
        # A package's orphaned subpackage has orphans of its own: repeat until none is left.
        for name in orphans:
            sys.modules.pop(name, None)
        forgotten += orphans
    return forgotten
