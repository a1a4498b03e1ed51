"""Sync targets by URL scheme: one module each, imported only when used (their libraries are extras)."""

from __future__ import annotations

from pipeline.config import StorageConfig
from pipeline.errors import SettingsError
from pipeline.sync.targets.base import Target

DEFAULT_TABLE = "embeddings"
SCHEMES = ("postgresql://", "lancedb://", "lancedb+s3://", "qdrant://", "qdrant+local://", "iceberg://")


def open_target(url: str, *, table: str | None = None, storage: StorageConfig | None = None) -> Target:
    """The target a --to URL names; --table names the table (or collection) where the URL does not."""
    scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
    try:
        if scheme in ("postgresql://", "postgres://"):
            from pipeline.sync.targets.pgvector import PgvectorTarget

            return PgvectorTarget(url, table or DEFAULT_TABLE)
        if scheme in ("lancedb://", "lancedb+s3://"):
            from pipeline.sync.targets.lancedb import LanceDBTarget

            return LanceDBTarget(url, table or DEFAULT_TABLE, storage or StorageConfig())
        if scheme in ("qdrant://", "qdrant+local://"):
            from pipeline.sync.targets.qdrant import QdrantTarget

            return QdrantTarget(url, table)
        if scheme == "iceberg://":
            from pipeline.sync.targets.iceberg import IcebergTarget

            return IcebergTarget(url, table)
    except ImportError as err:
        raise SettingsError(f"the {scheme} target needs {err.name}: pip install 'neobert-pipeline[sync]'") from err
    raise SettingsError(f"--to {url.split('@')[-1]!r}: not a sync target; use one of {', '.join(SCHEMES)}")
