"""A Ray Data datasink that writes Parquet parts under the commit protocol of manifest.py."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block

from pipeline.config import StorageConfig
from pipeline.faults import failpoint
from pipeline.io.layout import COMMITS, STAGING, atomic_write, exists_now, join, move, parquet_bytes, part_name
from pipeline.io.lease import check_lease
from pipeline.io.manifest import CommitRecord
from pipeline.io.recovery import ranges_of
from pipeline.io.schemas import split_dead_letters, with_generation
from pipeline.io.storage import filesystem_for


class CommittedParquetSink(Datasink):
    """Each write task stages one part (embeddings, and dead letters beside them), commits it with its
    row ranges, then publishes it; only while the run still holds the writer lease (lease_token)."""

    def __init__(
        self, output_url: str, storage: StorageConfig, generation: int, rows_per_part: int, lease_token: int = 0
    ) -> None:
        self.output_url = output_url
        self.storage = storage
        self.generation = generation
        self.rows_per_part = rows_per_part
        self.lease_token = lease_token

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"parts": 0, "rows": 0}
        table = pa.concat_tables(tables)
        fs, root = filesystem_for(self.output_url, self.storage)
        ranges = ranges_of(table)
        embedded, errors = (with_generation(t, self.generation) for t in split_dead_letters(table))
        reasons = pc.value_counts(errors.column("reason")).to_pylist() if errors.num_rows else []
        commit = CommitRecord(
            part_name(ranges, self.generation),
            table.num_rows,
            ranges,
            self.generation,
            {r["values"]: r["counts"] for r in reasons},
            self.lease_token,
        )
        files = {
            names: parquet_bytes(data)
            for names, data in zip(commit.files(), (t for t in (embedded, errors) if t.num_rows), strict=True)
        }
        for (staged, _), data in files.items():
            atomic_write(fs, join(root, STAGING, staged), data)
        failpoint("sink.after_stage")
        check_lease(fs, root, self.lease_token)  # a worker of a run that lost the lease commits nothing
        atomic_write(fs, join(root, COMMITS, f"{commit.part}.json"), commit.to_json())
        failpoint("sink.after_commit")
        check_lease(fs, root, self.lease_token)  # nor publishes: the holder's recovery sets its commit aside
        for (staged, target), data in files.items():
            try:
                move(fs, join(root, STAGING, staged), join(root, target))
            except FileNotFoundError:
                # A recovery published it already, or took it for uncommitted before this record was
                # written and deleted it: either way the bytes are still here.
                if not exists_now(fs, join(root, target)):
                    atomic_write(fs, join(root, target), data)
        return {"parts": 1, "rows": table.num_rows}
