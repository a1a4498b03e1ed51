"""LanceDB, embedded and server-free: lancedb:///absolute/dir, lancedb://relative/dir or
lancedb+s3://bucket/prefix; the table from --table.

Rows go in by merge-insert on id, updating only rows whose provenance differs (into a table that
was empty when the sync began, by plain append); deletions are predicates on (generation, shard).
The position is the one row of the table <table>__neobert_sync.
"""

from __future__ import annotations

import re

import lancedb
import pyarrow as pa

from pipeline.config import StorageConfig
from pipeline.errors import SettingsError
from pipeline.faults import failpoint
from pipeline.sync.log import Position, Versions, shard_batches
from pipeline.sync.rows import CHANGED_WHEN
from pipeline.sync.targets.base import Target, Upserted, other_shape

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,100}$")
SHARDS_PER_DELETE = 1_000
MIN_ROWS_FOR_INDEX = 5_000  # below this an exact scan is as fast as an index
POSITION_SCHEMA = pa.schema([("position", pa.string())])


class LanceDBTarget(Target):
    def __init__(self, url: str, table: str, storage: StorageConfig) -> None:
        if not NAME.match(table):
            raise SettingsError(f"--table {table!r}: use letters, digits, _ and -")
        scheme, where = url.split("://", 1)
        uri = f"s3://{where}" if scheme == "lancedb+s3" else where
        options = {}
        if scheme == "lancedb+s3" and storage.endpoint_url:
            options = {"aws_endpoint": storage.endpoint_url, "allow_http": "true"}
        self.description = f"{url} table {table}"
        self._db = lancedb.connect(uri, storage_options=options or None)
        self._name = table
        self._state_name = f"{table}__neobert_sync"

    def prepare(self, schema: pa.Schema, *, unique_ids: bool = False) -> None:
        if self._name in self._db.list_tables().tables:
            self._table = self._db.open_table(self._name)
            found = [(f.name, f.type) for f in self._table.schema]
            if found != [(f.name, f.type) for f in schema]:
                raise other_shape(
                    self.description, found, [(f.name, f.type) for f in schema], "sync into another --table"
                )
        else:
            self._table = self._db.create_table(self._name, schema=schema)
        # A table empty when the sync began takes rows by append when the view's ids are unique:
        # nothing can match. A sync killed meanwhile finds rows there next time and merges.
        self._empty_at_start = unique_ids and self._table.count_rows() == 0

    def position(self) -> Position | None:
        if self._state_name not in self._db.list_tables().tables:
            return None
        rows = self._db.open_table(self._state_name).to_arrow().column("position").to_pylist()
        return Position.from_json(rows[0]) if rows else None

    def upsert(self, rows: pa.Table) -> Upserted:
        if self._empty_at_start:
            self._table.add(rows)
            failpoint("sync.in_batch")
            return Upserted(inserted=rows.num_rows)
        changed = " OR ".join(f"target.`{name}` != source.`{name}`" for name in CHANGED_WHEN)
        result = (
            self._table.merge_insert("id")
            .when_matched_update_all(where=changed)
            .when_not_matched_insert_all()
            .execute(rows)
        )
        failpoint("sync.in_batch")  # written, not yet counted or recorded
        inserted, updated = result.num_inserted_rows, result.num_updated_rows
        return Upserted(inserted, updated, rows.num_rows - inserted - updated)

    def delete_versions(self, versions: Versions) -> int:
        deleted = 0
        for generation, shards in shard_batches(versions, SHARDS_PER_DELETE):
            listed = ", ".join(_literal(s) for s in shards)
            deleted += self._table.delete(f"generation = {int(generation)} AND shard IN ({listed})").num_deleted_rows
        return deleted

    def save_position(self, position: Position) -> None:
        row = pa.table({"position": [position.to_json()]}, schema=POSITION_SCHEMA)
        self._db.create_table(self._state_name, data=row, mode="overwrite")

    def count(self) -> int:
        return self._table.count_rows()

    def create_index(self, metric: str) -> None:
        rows = self._table.count_rows()
        if rows >= MIN_ROWS_FOR_INDEX:
            self._table.create_index(
                metric="cosine" if metric == "cosine" else "dot",
                vector_column_name="embedding",
                index_type="IVF_HNSW_SQ",
                num_partitions=max(1, rows // 100_000),
            )


def _literal(text: str) -> str:
    """A SQL string literal (the predicate language takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"
