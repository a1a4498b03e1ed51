"""Apache Iceberg through pyiceberg: iceberg://CATALOG/namespace.table.

CATALOG is a catalog named in pyiceberg's own configuration (~/.pyiceberg.yaml, or environment
variables PYICEBERG_CATALOG__<NAME>__URI, __WAREHOUSE, __TYPE...): a SQL catalog on SQLite for local
use, REST or Glue in production, with its warehouse on local disk or object storage.

A batch's ids are looked up in the table (not in a table empty when the sync began); new rows are
appended and rows whose provenance changed
are overwritten, inside one transaction per part that also sets the table property
`neobert.position`: the rows and the position that covers them commit together, or not at all.
Iceberg has no fixed-size list or half float: embeddings are list<float>.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import SettingsError, TargetUnreachableError
from pipeline.faults import failpoint
from pipeline.sync.log import Position, Versions, shard_batches
from pipeline.sync.rows import CHANGED_WHEN
from pipeline.sync.targets.base import Target, Upserted, other_shape

POSITION_PROPERTY = "neobert.position"
SHARDS_PER_DELETE = 1_000


class IcebergTarget(Target):
    def __init__(self, url: str, table: str | None) -> None:
        from pyiceberg.catalog import load_catalog

        catalog, _, path = url.removeprefix("iceberg://").partition("/")
        name = ".".join(part for part in (path.strip("/"), table) if part)  # --table names it in the namespace
        if not catalog or "." not in name:
            raise SettingsError(
                f"--to {url}: use iceberg://CATALOG/namespace.table (or iceberg://CATALOG/namespace --table NAME)"
            )
        self.description = f"iceberg://{catalog}/{name}"
        self._name = name
        try:
            self._catalog = load_catalog(catalog)
        except Exception as err:  # pyiceberg raises ValueError, OSError or its own errors here
            raise TargetUnreachableError(
                f"{self.description}: catalog {catalog!r} could not be opened ({err}); configure it in "
                f"~/.pyiceberg.yaml or PYICEBERG_CATALOG__{catalog.upper()}__URI and __WAREHOUSE"
            ) from None
        self._tx = None

    def prepare(self, schema: pa.Schema, *, unique_ids: bool = False) -> None:
        from pyiceberg.exceptions import NoSuchTableError

        self._schema = iceberg_arrow_schema(schema)
        try:
            self._table = self._catalog.load_table(self._name)
        except NoSuchTableError:
            self._catalog.create_namespace_if_not_exists(self._name.rsplit(".", 1)[0])
            self._table = self._catalog.create_table(self._name, schema=self._schema)
        # A table empty when the sync began takes rows by append, with no lookups, when the view's ids
        # are unique. A sync killed meanwhile finds rows there next time and looks them up.
        self._empty_at_start = unique_ids and self._table.scan().count() == 0
        found, wanted = _columns(self._table.schema().as_arrow()), _columns(self._schema)
        if found != wanted:
            raise other_shape(self.description, found, wanted, "sync into another table")

    def position(self) -> Position | None:
        text = self._table.properties.get(POSITION_PROPERTY)
        return Position.from_json(text) if text else None

    def upsert(self, rows: pa.Table) -> Upserted:
        from pyiceberg.expressions import In

        rows = rows.cast(self._schema)
        tx = self._transaction()
        if self._empty_at_start:
            tx.append(rows)
            failpoint("sync.in_batch")
            return Upserted(inserted=rows.num_rows)
        ids = rows.column("id")
        stored = self._scan(tx, In("id", ids.to_pylist()), ("id", *CHANGED_WHEN))
        known = pc.is_in(ids, stored.column("id"))
        new = rows.filter(pc.invert(known))
        matched = rows.filter(known)
        if matched.num_rows:
            joined = matched.select(["id", *CHANGED_WHEN]).join(stored, "id", right_suffix="_stored")
            same = None
            for name in CHANGED_WHEN:
                equal = pc.equal(joined.column(name), joined.column(f"{name}_stored"))
                same = equal if same is None else pc.and_(same, equal)
            changed_ids = pc.filter(joined.column("id"), pc.invert(same))
            changed = matched.filter(pc.is_in(matched.column("id"), changed_ids))
        else:
            changed = matched
        if changed.num_rows:
            tx.overwrite(changed, overwrite_filter=In("id", changed.column("id").to_pylist()))
        if new.num_rows:
            tx.append(new)
        failpoint("sync.in_batch")  # written, not committed: the files are garbage, the table unchanged
        return Upserted(new.num_rows, changed.num_rows, rows.num_rows - new.num_rows - changed.num_rows)

    def delete_versions(self, versions: Versions) -> int:
        from pyiceberg.expressions import And, EqualTo, In

        tx, deleted = self._transaction(), 0
        for generation, shards in shard_batches(versions, SHARDS_PER_DELETE):
            selected = And(EqualTo("generation", generation), In("shard", shards))
            deleted += self._scan(tx, selected, ("id",)).num_rows
            tx.delete(selected)
        return deleted

    def save_position(self, position: Position) -> None:
        tx = self._transaction()
        tx.set_properties({POSITION_PROPERTY: position.to_json()})
        tx.commit_transaction()
        self._tx = None
        self._table = self._catalog.load_table(self._name)

    def count(self) -> int:
        return self._catalog.load_table(self._name).scan().count()

    def close(self) -> None:
        self._tx = None  # an uncommitted transaction is dropped: the table keeps its last commit

    def _transaction(self):
        if self._tx is None:
            self._tx = self._table.transaction()
        return self._tx

    def _scan(self, tx, row_filter, columns) -> pa.Table:
        """Rows as the transaction sees them (its own uncommitted writes included)."""
        from pyiceberg.table import DataScan

        scan = DataScan(
            table_metadata=tx.table_metadata, io=self._table.io, row_filter=row_filter, selected_fields=columns
        )
        return scan.to_arrow()


def iceberg_arrow_schema(schema: pa.Schema) -> pa.Schema:
    """The target schema in the types Iceberg has: embeddings as list<float>."""
    return pa.schema(
        [
            pa.field(f.name, pa.list_(pa.field("element", pa.float32())), f.nullable)
            if pa.types.is_fixed_size_list(f.type)
            else f
            for f in schema
        ]
    )


def _columns(schema: pa.Schema) -> list[tuple[str, str]]:
    # Iceberg reads strings and lists back as their large Arrow forms: the same column.
    return [(f.name, str(f.type).replace("large_", "")) for f in schema]
