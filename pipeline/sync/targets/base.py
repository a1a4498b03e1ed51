"""What every sync target does. A new kind of target is one module with one Target subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa

from pipeline.errors import TargetConflictError
from pipeline.sync.log import Position, Versions


@dataclass
class Upserted:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0


class Target(ABC):
    """A table of target rows (sync.rows) keyed by id, and the position of the log it has applied.

    Every operation is idempotent: a sync killed anywhere is re-run from the last saved position
    and converges on the same rows.
    """

    description: str
    """Where the target is, credentials left out: for messages."""

    @abstractmethod
    def prepare(self, schema: pa.Schema, *, unique_ids: bool = False) -> None:
        """Create the table if there is none; refuse (TargetConflictError) one of another shape.

        unique_ids: the output's current view cannot repeat an id (derived ids, or --duplicate-ids
        reject), so a target empty at the start may append without looking ids up."""

    @abstractmethod
    def position(self) -> Position | None:
        """The position saved last, or None for a target no sync has written to."""

    @abstractmethod
    def upsert(self, rows: pa.Table) -> Upserted:
        """Insert rows with new ids; update those whose stored provenance differs (rows.CHANGED_WHEN)."""

    @abstractmethod
    def delete_versions(self, versions: Versions) -> int:
        """Delete the rows of these (shard, generation) versions; how many were deleted."""

    @abstractmethod
    def save_position(self, position: Position) -> None: ...

    @abstractmethod
    def count(self) -> int:
        """Rows the table holds."""

    def create_index(self, metric: str) -> None:  # noqa: B027 (a target without index builds keeps this)
        """Build a vector index for `metric` (cosine or dot), after loading."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""


def other_shape(description: str, found, wanted, advice: str) -> TargetConflictError:
    """The error for a table that exists with other (name, type) columns than the output needs."""
    return TargetConflictError(
        f"{description} exists with columns {_listed(found)}; this output needs {_listed(wanted)}: {advice}"
    )


def _listed(columns) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns)
