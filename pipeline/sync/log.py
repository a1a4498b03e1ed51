"""What a sync has to apply: the output's log of parts and generations, against the position a
target records.

A target holds the output's current view. Two things move the view on: a new part (its current rows
are inserted or update rows by id) and a new generation (rows of the shard versions it changed or
deleted leave the view). So a target's position is the set of parts whose current rows it holds and
the number of generations whose removals it has applied; with the output's identity, so that no
target ever takes rows from two outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa

from pipeline.errors import NoInputError
from pipeline.io.current import current_parts
from pipeline.io.generations import DELETED, recorded_inputs
from pipeline.io.layout import RUN_RECORD
from pipeline.io.ledger import INPUT_COLUMNS, current_versions
from pipeline.io.manifest import CommitRecord, read_state
from pipeline.io.run_record import read_run_record

Versions = list[tuple[str, int]]
"""(shard, generation) pairs: versions of shards whose rows leave the view."""


@dataclass(frozen=True)
class Position:
    """How far a target has applied an output's log (stored in the target)."""

    output: str
    """The output's identity (output_identity)."""
    generations: int
    """Generations whose removals are applied: the target holds no row of a version they superseded."""
    parts: frozenset[str] = field(default_factory=frozenset)
    """Parts whose current rows the target holds."""

    def to_json(self) -> str:
        return json.dumps({"output": self.output, "generations": self.generations, "parts": sorted(self.parts)})

    @classmethod
    def from_json(cls, text: str) -> Position:
        data = json.loads(text)
        return cls(data["output"], int(data["generations"]), frozenset(data["parts"]))


@dataclass
class Log:
    """The output as a sync sees it."""

    identity: str
    generations: int
    parts: list[tuple[CommitRecord, list[str]]]
    """(part, its current shards) of every part holding a current row, by part name."""
    inputs: pa.Table
    """Every generation's entries (generations.INPUTS_SCHEMA)."""
    settings: dict

    @property
    def unique_ids(self) -> bool:
        """The current view cannot repeat an id: ids derived from shard and row, or repeats rejected."""
        return self.settings.get("id_field") is None or self.settings.get("duplicate_ids") == "reject"

    def to_apply(self, position: Position | None) -> list[tuple[CommitRecord, list[str]]]:
        applied = position.parts if position else frozenset()
        return [(commit, shards) for commit, shards in self.parts if commit.part not in applied]

    def superseded_since(self, generations: int) -> Versions:
        """Versions that generations from `generations` on changed or deleted: their rows leave the view."""
        return superseded_versions(self.inputs, since=generations)

    def position(self) -> Position:
        """The position of a target that holds the whole current view."""
        return Position(self.identity, self.generations, frozenset(c.part for c, _ in self.parts))


def read_log(fs: fsspec.AbstractFileSystem, root: str, output_url: str) -> Log:
    record = read_run_record(fs, root)
    if record is None:
        raise NoInputError(f"{output_url} has no {RUN_RECORD}: not an output of neobert-pipeline")
    inputs = recorded_inputs(fs, root, record)
    parts = current_parts(read_state(fs, root).commits, current_versions(inputs.select(INPUT_COLUMNS)))
    return Log(output_identity(record), len(record["generations"]), parts, inputs, record["settings"])


def output_identity(record: dict) -> str:
    """A short stable name for one output: its first generation (where, when) and its model."""
    first = record["generations"][0] if record["generations"] else {}
    basis = [first.get("input"), first.get("created"), record["settings"].get("model_weights_sha256")]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:16]


def shard_batches(versions: Versions, size: int) -> Iterator[tuple[int, list[str]]]:
    """(generation, up to `size` shards of it): versions grouped for targets that delete by predicate."""
    by_generation: dict[int, list[str]] = {}
    for shard, generation in versions:
        by_generation.setdefault(generation, []).append(shard)
    for generation, shards in sorted(by_generation.items()):
        for start in range(0, len(shards), size):
            yield generation, shards[start : start + size]


def superseded_versions(inputs: pa.Table, *, since: int) -> Versions:
    """(shard, generation) of every version that an entry of generation >= since replaced or deleted."""
    latest: dict[str, int] = {}
    gone: Versions = []
    columns = (inputs.column(name).to_pylist() for name in ("shard", "generation", "change"))
    for shard, generation, change in zip(*columns, strict=True):
        before = latest.pop(shard, None)
        if before is not None and generation >= since:
            gone.append((shard, before))
        if change != DELETED:
            latest[shard] = generation
    return gone
