"""PostgreSQL with pgvector: postgresql://user[:password]@host:port/database, --table [schema.]name.

Each batch is one transaction: binary COPY into a temporary staging table, then one set-based
upsert that skips rows whose provenance is unchanged. Deletions are one set-based DELETE per batch
of versions. The position is a row of <table>_neobert_sync. The HNSW index is built after loading
(building it first would make every insert pay for it). Identifiers are validated and quoted; every
value travels as a parameter.
"""

from __future__ import annotations

import re

import psycopg
import pyarrow as pa
from psycopg import sql

from pipeline.errors import SettingsError, TargetUnreachableError
from pipeline.faults import failpoint
from pipeline.sync.log import Position, Versions
from pipeline.sync.rows import CHANGED_WHEN
from pipeline.sync.targets.base import Target, Upserted, other_shape
from pipeline.sync.targets.pg_binary import copy_data

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,46}$")  # leaves room for the suffixes of derived names
CONNECT_TIMEOUT_S = 10
VERSIONS_PER_DELETE = 10_000
INDEX_BUILD_MEMORY = "2GB"
SQL_TYPES = {
    pa.string(): "text",
    pa.int64(): "bigint",
    pa.int32(): "integer",
    pa.bool_(): "boolean",
}


class PgvectorTarget(Target):
    def __init__(self, url: str, table: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        self.description = (
            f"postgresql://{info.get('user') or ''}@{info.get('host') or ''}:{info.get('port') or 5432}"
            f"/{info.get('dbname') or ''} table {table}"
        )
        *schema, name = table.split(".")
        if len(schema) > 1 or not all(NAME.match(part) for part in [*schema, name]):
            raise SettingsError(
                f"--table {table!r}: use [schema.]name of letters, digits and _ (up to 47 characters each)"
            )
        self._table = sql.Identifier(*schema, name)
        self._state = sql.Identifier(*schema, f"{name}_neobert_sync")
        self._index = sql.Identifier(f"{name}_embedding_hnsw")
        self._versions_index = sql.Identifier(f"{name}_shard_generation")
        self._stage = sql.Identifier(f"{name}_neobert_stage")
        self._qualified = ".".join([*schema, name])
        try:
            self._db = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
        except psycopg.OperationalError as err:
            why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            refused = "password" in why or "authentication" in why
            what = "refused the credentials" if refused else "could not be reached"
            raise TargetUnreachableError(
                f"{self.description} {what} ({why}); check the URL, the server and the user's password "
                "(PGPASSWORD or ~/.pgpass keep it out of the command line)"
            ) from None

    def prepare(self, schema: pa.Schema, *, unique_ids: bool = False) -> None:
        vector = "halfvec" if schema.field("embedding").type.value_type == pa.float16() else "vector"
        dim = schema.field("embedding").type.list_size
        columns = [(f.name, f"{vector}({dim})" if f.name == "embedding" else SQL_TYPES[f.type]) for f in schema]
        with self._db.transaction():
            self._db.execute("CREATE EXTENSION IF NOT EXISTS vector")
            found = self._db.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                [self._qualified],
            ).fetchall()
            if found and found != columns:
                raise other_shape(self.description, found, columns, "sync into another --table, or drop that one")
            if not found:
                definition = sql.SQL(", ").join(
                    sql.SQL("{} {}{}").format(
                        sql.Identifier(name), sql.SQL(kind), sql.SQL(" PRIMARY KEY" if name == "id" else "")
                    )
                    for name, kind in columns
                )
                self._db.execute(sql.SQL("CREATE TABLE {} ({})").format(self._table, definition))
                self._db.execute(
                    sql.SQL("CREATE INDEX {} ON {} (shard, generation)").format(self._versions_index, self._table)
                )
            self._db.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (only_row boolean PRIMARY KEY, position jsonb NOT NULL)").format(
                    self._state
                )
            )
        self._columns = [name for name, _ in columns]

    def position(self) -> Position | None:
        row = self._db.execute(sql.SQL("SELECT position::text FROM {}").format(self._state)).fetchone()
        return None if row is None else Position.from_json(row[0])

    def upsert(self, rows: pa.Table) -> Upserted:
        names = sql.SQL(", ").join(map(sql.Identifier, self._columns))
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in self._columns if name != "id"
        )
        changed = sql.SQL(" OR ").join(
            sql.SQL("t.{0} IS DISTINCT FROM EXCLUDED.{0}").format(sql.Identifier(name)) for name in CHANGED_WHEN
        )
        with self._db.transaction():
            self._db.execute(
                sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
                    self._stage, self._table
                )
            )
            with self._db.cursor().copy(
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self._stage, names)
            ) as copy:
                copy.write(copy_data(rows.select(self._columns)))
            failpoint("sync.in_batch")  # a kill here rolls the whole batch back
            inserted, updated = self._db.execute(
                sql.SQL(
                    "WITH up AS (INSERT INTO {table} AS t ({names}) SELECT {names} FROM {stage} "
                    "ON CONFLICT (id) DO UPDATE SET {updates} WHERE {changed} RETURNING (xmax = 0) AS inserted) "
                    "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
                ).format(table=self._table, names=names, stage=self._stage, updates=updates, changed=changed)
            ).fetchone()
        return Upserted(inserted, updated, rows.num_rows - inserted - updated)

    def delete_versions(self, versions: Versions) -> int:
        deleted = 0
        for start in range(0, len(versions), VERSIONS_PER_DELETE):
            batch = versions[start : start + VERSIONS_PER_DELETE]
            with self._db.transaction():
                deleted += self._db.execute(
                    sql.SQL(
                        "DELETE FROM {} AS t USING unnest(%s::text[], %s::integer[]) AS v(shard, generation) "
                        "WHERE t.shard = v.shard AND t.generation = v.generation"
                    ).format(self._table),
                    [[shard for shard, _ in batch], [generation for _, generation in batch]],
                ).rowcount
        return deleted

    def save_position(self, position: Position) -> None:
        with self._db.transaction():
            self._db.execute(
                sql.SQL(
                    "INSERT INTO {} (only_row, position) VALUES (true, %s::jsonb) "
                    "ON CONFLICT (only_row) DO UPDATE SET position = EXCLUDED.position"
                ).format(self._state),
                [position.to_json()],
            )

    def count(self) -> int:
        (rows,) = self._db.execute(sql.SQL("SELECT count(*) FROM {}").format(self._table)).fetchone()
        return rows

    def create_index(self, metric: str) -> None:
        kind = self._db.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attname = 'embedding'",
            [self._qualified],
        ).fetchone()[0]
        ops = f"{kind.split('(')[0]}_{'cosine' if metric == 'cosine' else 'ip'}_ops"
        with self._db.transaction():
            # An HNSW build whose graph outgrows maintenance_work_mem (64 MB by default) slows down
            # many times over; give this one transaction room, never less than the server has.
            self._db.execute(
                "SELECT set_config('maintenance_work_mem', %s, true) "
                "WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes(%s)",
                [INDEX_BUILD_MEMORY, INDEX_BUILD_MEMORY],
            )
            self._db.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding {})").format(
                    self._index, self._table, sql.SQL(ops)
                )
            )

    def close(self) -> None:
        self._db.close()
