"""The columns the pipeline writes: embeddings in parts/, dead letters in errors/, and the stream
between the embedding stage and the sink that carries both."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Columns of a dead letter as it travels with the documents (reason code null for good rows).
ERROR_FIELDS = [("error", pa.string()), ("error_message", pa.string()), ("excerpt", pa.string())]
# The generation a part belongs to (generations.py), on every row of parts/ and errors/ since
# manifest version 2: a row is current when its (shard, generation) is a current shard's.
GENERATION_FIELD = pa.field("generation", pa.int32())
# A dead letter as the embedding stage hands it to the sink.
ERROR_ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("excerpt", pa.string()),
    ]
)
# The errors dataset: one row per input row that could not be embedded.
ERRORS_SCHEMA = ERROR_ROWS_SCHEMA.append(GENERATION_FIELD)


# Columns a chunked output row has besides a document's.
CHUNK_FIELDS = [("chunk", pa.int32()), ("char_start", pa.int64()), ("char_end", pa.int64())]


def output_schema(hidden_size: int, output_dtype: str, *, chunks: bool = False, generation: bool = True) -> pa.Schema:
    """One row per document in the output Parquet; with chunks, one row per chunk of a document.
    Without generation: the rows as the embedding stage makes them, before the sink adds it."""
    element = pa.float16() if output_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            *(CHUNK_FIELDS if chunks else []),
            ("embedding", pa.list_(element, hidden_size)),
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            ("shard", pa.string()),
            ("row", pa.int64()),
            *([GENERATION_FIELD] if generation else []),
        ]
    )


def with_generation(table: pa.Table, generation: int) -> pa.Table:
    return table.append_column(GENERATION_FIELD, pa.array([generation] * table.num_rows, pa.int32()))


def stream_schema(hidden_size: int, output_dtype: str, *, chunks: bool = False) -> pa.Schema:
    """What the embedding stage emits, one row per input row: embedded documents (with chunks, lists of
    their chunks' vectors, token counts and spans) and dead letters (null embedding, reason set).

    A document's chunks travel as one row so that Ray never splits them across two output parts.
    """
    fields = list(output_schema(hidden_size, output_dtype, generation=False))
    if chunks:
        listed = {"embedding", "n_tokens"}
        fields = [pa.field(f.name, pa.list_(f.type)) if f.name in listed else f for f in fields]
        fields += [pa.field(name, pa.list_(kind)) for name, kind in CHUNK_FIELDS[1:]]
    return pa.schema([*fields, *(pa.field(name, kind) for name, kind in ERROR_FIELDS)])


def split_dead_letters(stream: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(embedded rows, dead letters in ERROR_ROWS_SCHEMA) of a stream_schema table; the sink adds the
    generation."""
    is_error = pc.is_valid(stream.column("error"))
    embedded = stream.filter(pc.invert(is_error)).drop_columns([name for name, _ in ERROR_FIELDS])
    if pa.types.is_list(embedded.schema.field("n_tokens").type):
        embedded = _one_row_per_chunk(embedded)
    errors = stream.filter(is_error).select(["id", "shard", "row", "error", "error_message", "excerpt"])
    return embedded, errors.rename_columns(ERROR_ROWS_SCHEMA.names).cast(ERROR_ROWS_SCHEMA)


def _one_row_per_chunk(documents: pa.Table) -> pa.Table:
    hidden = documents.schema.field("embedding").type.value_type
    dtype = "float16" if hidden.value_type == pa.float16() else "float32"
    schema = output_schema(hidden.list_size, dtype, chunks=True, generation=False)
    if documents.num_rows == 0:
        return schema.empty_table()
    documents = documents.combine_chunks()
    parents = pc.list_parent_indices(documents.column("n_tokens")).to_numpy()  # (chunks,) document of each
    offsets = documents.column("n_tokens").chunk(0).offsets.to_numpy()
    columns = {name: documents.column(name).take(parents) for name in ("id", "truncated", "shard", "row")}
    for name in ("embedding", "n_tokens", "char_start", "char_end"):
        columns[name] = pc.list_flatten(documents.column(name))
    columns["chunk"] = pa.array(np.arange(len(parents)) - offsets[parents], pa.int32())
    return pa.table([columns[name] for name in schema.names], schema=schema)
