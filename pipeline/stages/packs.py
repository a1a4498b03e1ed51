"""The contract between the pack stage and the embed stage: what a pack holds, in one schema.

A pack is one row of PACK_SCHEMA: sequences laid back to back for one forward pass, plus the
per-document fields that travel with them to the output. A sequence is a document, or with chunking
one window of a document; sequences_per_doc says how many each document has. A pack of dead letters
(rows that could not become documents) is marked by its `dead_letters` flag and holds no tokens: it
passes the embed stage untouched, on its way to the errors dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io.schemas import ERROR_FIELDS

# How documents past max_length tokens are embedded.
LONG_DOCUMENTS = ("truncate", "chunk", "chunk-mean")

PACK_SCHEMA = pa.schema(
    [
        ("dead_letters", pa.bool_()),
        ("input_ids", pa.list_(pa.int32())),  # (T,) tokens of every sequence, back to back
        ("cu_seqlens", pa.list_(pa.int32())),  # (S+1,) where each sequence starts, then the end
        ("sequences_per_doc", pa.list_(pa.int32())),  # (N,) 1 per document, or its number of windows
        ("char_start", pa.list_(pa.int64())),  # (S,) with chunking only: each window's span in its text
        ("char_end", pa.list_(pa.int64())),
        ("truncated", pa.list_(pa.bool_())),  # (N,)
        ("id", pa.list_(pa.string())),  # (N,) and the rest: per document, passed through as they are
        ("shard", pa.list_(pa.string())),
        ("row", pa.list_(pa.int64())),
        *[(name, pa.list_(kind)) for name, kind in ERROR_FIELDS],
    ]
)
# Per-document fields that the embed stage passes to the output unchanged.
PER_DOC_FIELDS = ("id", "shard", "row", *(name for name, _ in ERROR_FIELDS))


class PackContractError(AssertionError):
    """A pack breaks the contract: a bug in the pack stage, never the user's input."""


@dataclass(frozen=True)
class Pack:
    """One pack, unpacked: numpy arrays for the token side, Arrow arrays for the per-document fields."""

    dead_letters: bool
    input_ids: np.ndarray
    cu_seqlens: np.ndarray
    sequences_per_doc: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    truncated: pa.Array
    docs: dict[str, pa.Array]
    """PER_DOC_FIELDS, one value per document."""

    @property
    def n_docs(self) -> int:
        return len(self.sequences_per_doc)

    @property
    def tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def check(self) -> Pack:
        """Raise PackContractError unless every field has the length the contract gives it."""
        n, sequences = self.n_docs, len(self.cu_seqlens) - 1
        problems = []
        if self.cu_seqlens[0] != 0 or self.tokens != len(self.input_ids) or np.any(np.diff(self.cu_seqlens) < 0):
            problems.append("cu_seqlens does not run from 0 to the token count")
        if self.dead_letters != (sequences == 0):
            problems.append("a dead-letter pack must hold no sequences, and only it")
        if int(self.sequences_per_doc.sum()) != sequences:
            problems.append(f"sequences_per_doc adds up to {int(self.sequences_per_doc.sum())}, not {sequences}")
        if len(self.char_start) not in (0, sequences) or len(self.char_end) != len(self.char_start):
            problems.append("char_start/char_end must be empty or have one value per sequence")
        lengths = {name: len(values) for name, values in self.docs.items()} | {"truncated": len(self.truncated)}
        if set(self.docs) != set(PER_DOC_FIELDS) or any(length != n for length in lengths.values()):
            problems.append(f"per-document fields {lengths} do not all hold {n} values")
        if problems:
            raise PackContractError("; ".join(problems))
        return self


def documents_pack(
    rows: pa.Table,
    input_ids: np.ndarray,
    cu_seqlens: np.ndarray,
    truncated: np.ndarray,
    sequences_per_doc: np.ndarray | None = None,
    spans: tuple[np.ndarray, np.ndarray] | None = None,
) -> Pack:
    """A pack of documents from their rows (PER_DOC_FIELDS columns) and their tokens."""
    if sequences_per_doc is None:  # one sequence per document
        sequences_per_doc = np.ones(rows.num_rows, np.int32)
    empty = np.zeros(0, np.int64)
    return Pack(
        False,
        input_ids,
        cu_seqlens,
        sequences_per_doc,
        empty if spans is None else spans[0],
        empty if spans is None else spans[1],
        pa.array(truncated, pa.bool_()),
        {name: rows.column(name).combine_chunks() for name in PER_DOC_FIELDS},
    )


def dead_letter_pack(rows: pa.Table) -> Pack:
    """A pack of rows that could not become documents (their error fields say why)."""
    n = rows.num_rows
    return Pack(
        True,
        np.zeros(0, np.int32),
        np.zeros(1, np.int32),
        np.zeros(n, np.int32),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        pa.array(np.zeros(n, bool)),
        {name: rows.column(name).combine_chunks() for name in PER_DOC_FIELDS},
    )


def packs_to_table(packs: list[Pack]) -> pa.Table:
    """One PACK_SCHEMA row per pack."""
    columns = {
        "dead_letters": pa.array([p.dead_letters for p in packs], pa.bool_()),
        "input_ids": [p.input_ids for p in packs],
        "cu_seqlens": [p.cu_seqlens for p in packs],
        "sequences_per_doc": [p.sequences_per_doc for p in packs],
        "char_start": [p.char_start for p in packs],
        "char_end": [p.char_end for p in packs],
        "truncated": [p.truncated for p in packs],
        **{name: [p.docs[name] for p in packs] for name in PER_DOC_FIELDS},
    }
    arrays = [
        columns[field.name] if field.name == "dead_letters" else _list_array(columns[field.name], field.type.value_type)
        for field in PACK_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PACK_SCHEMA)


def table_to_packs(table: pa.Table) -> list[Pack]:
    """The packs of a PACK_SCHEMA table, each checked against the contract."""
    packs = []
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        lists = {name: row.column(name).chunk(0).flatten() for name in PACK_SCHEMA.names if name != "dead_letters"}
        packs.append(
            Pack(
                dead_letters=row.column("dead_letters")[0].as_py(),
                input_ids=lists["input_ids"].to_numpy(),
                cu_seqlens=lists["cu_seqlens"].to_numpy(),
                sequences_per_doc=lists["sequences_per_doc"].to_numpy(),
                char_start=lists["char_start"].to_numpy(),
                char_end=lists["char_end"].to_numpy(),
                truncated=lists["truncated"],
                docs={name: lists[name] for name in PER_DOC_FIELDS},
            ).check()
        )
    return packs


def _list_array(parts: list, value_type: pa.DataType) -> pa.ListArray:
    values = [p if isinstance(p, pa.Array) else pa.array(p, value_type) for p in parts]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = pa.concat_arrays([v.cast(value_type) for v in values]) if values else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)
