"""The rows a sync target stores: a key, the embedding and where it came from.

Document output: the key is the document id. Chunked output: the key is '<id>#<chunk>', with the
document id, chunk and character span kept beside it. Within one output a row's vector is a function
of its provenance (shard, generation, row; and chunk), so a row whose provenance is unchanged needs
no update: that is how targets tell updated rows from unchanged ones without comparing vectors.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import BadInputError

PROVENANCE = ("shard", "row", "generation", "n_tokens", "truncated")
CHUNK_COLUMNS = ("document_id", "chunk", "char_start", "char_end")
CHANGED_WHEN = ("shard", "row", "generation")
"""A stored row needs updating when one of these differs (see the module docstring)."""


def target_schema(hidden_size: int, output_dtype: str, *, chunks: bool) -> pa.Schema:
    element = pa.float16() if output_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(element, hidden_size)),
            ("shard", pa.string()),
            ("row", pa.int64()),
            ("generation", pa.int32()),
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            *(
                [
                    ("document_id", pa.string()),
                    ("chunk", pa.int32()),
                    ("char_start", pa.int64()),
                    ("char_end", pa.int64()),
                ]
                if chunks
                else []
            ),
        ]
    )


def schema_of(settings: dict) -> pa.Schema:
    """target_schema for an output, from its run record's settings."""
    return target_schema(
        settings["hidden_size"], settings["output_dtype"], chunks=settings.get("long_documents") == "chunk"
    )


def part_columns(schema: pa.Schema) -> list[str]:
    """The columns of a part that target rows are made of."""
    names = ["id", "embedding", *PROVENANCE]
    return names + (["chunk", "char_start", "char_end"] if "chunk" in schema.names else [])


def to_target_rows(part_rows: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """A part's current rows as target rows; repeated keys are refused (a target keeps one row per key)."""
    if "chunk" in schema.names:
        document = part_rows.column("id")
        key = pc.binary_join_element_wise(document, pc.cast(part_rows.column("chunk"), pa.string()), "#")
        part_rows = part_rows.drop_columns(["id"]).append_column("id", key).append_column("document_id", document)
    rows = part_rows.select(schema.names).cast(schema)
    counts = pc.value_counts(rows.column("id"))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise BadInputError(
            f"id {repeated[0].as_py()!r} appears more than once in {where}'s current rows, and a sync target keeps "
            "one row per id; embed with --duplicate-ids reject (or without --id-field) to make ids unique"
        )
    return rows
