"""The CPU stage: tokenize rows and cut them into packs, a plain callable over Arrow tables.

It imports no torch, so the Ray workers that run it stay light; embed_stage.py holds the model side.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.io.schemas import ERROR_FIELDS
from pipeline.tokenizer import TextTokenizer

# How documents past max_length tokens are embedded.
LONG_DOCUMENTS = ("truncate", "chunk", "chunk-mean")

# One row per pack: sequences laid back to back, ready for one forward pass; or, with no tokens, the
# dead letters of a batch on their way to the errors dataset. A sequence is a document, or with
# chunking one window of a document; sequences_per_doc says how many each document has.
PACK_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("cu_seqlens", pa.list_(pa.int32())),
        ("sequences_per_doc", pa.list_(pa.int32())),
        ("char_start", pa.list_(pa.int64())),  # per sequence, with chunking only
        ("char_end", pa.list_(pa.int64())),
        ("id", pa.list_(pa.string())),
        ("shard", pa.list_(pa.string())),
        ("row", pa.list_(pa.int64())),
        ("truncated", pa.list_(pa.bool_())),
        *[(name, pa.list_(kind)) for name, kind in ERROR_FIELDS],
    ]
)
PER_DOC_FIELDS = ("id", "shard", "row", *(name for name, _ in ERROR_FIELDS))


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, max_length: int) -> TextTokenizer:
    # Built once per worker process, then reused by every task that lands there.
    return TextTokenizer(Tokenizer.from_str(tokenizer_json), max_length)


def tokenize_and_pack(
    rows: pa.Table,
    *,
    tokenizer_json: str,
    max_length: int,
    tokens_per_batch: int,
    long_documents: str = "truncate",
    chunk_overlap: int = 0,
) -> pa.Table:
    """Tokenize a batch of rows, sort by length and cut into token-budget packs (one output row each).

    With chunking, a document's windows always share one pack, so its vectors are made together.
    """
    tokenizer = _tokenizer(tokenizer_json, max_length)
    is_error = pc.is_valid(rows.column("error"))
    dead_letters, rows = rows.filter(is_error), rows.filter(pc.invert(is_error))
    texts = rows.column("text").to_pylist()
    packs: dict[str, list] = {name: [] for name in PACK_SCHEMA.names}
    if long_documents == "truncate":
        tokenized = tokenizer.encode(texts)
        for members in plan_batches(tokenized.lengths, tokens_per_batch):
            flat, cu_seqlens = pack_token_ids([tokenized.ids[i] for i in members])
            _append_pack(packs, rows.take(pa.array(members)), flat, cu_seqlens, tokenized.truncated[members])
    else:
        chunks = tokenizer.chunk(texts, chunk_overlap)
        first = np.concatenate([[0], np.cumsum(chunks.chunks_per_text)])  # (docs + 1,) first chunk of each
        lengths = np.fromiter((len(c) for c in chunks.ids), np.int64, len(chunks.ids))
        doc_tokens = np.add.reduceat(lengths, first[:-1]) if len(texts) else np.zeros(0, np.int64)
        for members in plan_batches(doc_tokens, tokens_per_batch):
            windows = np.concatenate([np.arange(first[d], first[d + 1]) for d in members])
            flat, cu_seqlens = pack_token_ids([chunks.ids[w] for w in windows])
            spans = (chunks.char_start[windows], chunks.char_end[windows])
            _append_pack(
                packs,
                rows.take(pa.array(members)),
                flat,
                cu_seqlens,
                np.zeros(len(members), bool),
                chunks.chunks_per_text[members],
                spans,
            )
    if dead_letters.num_rows:
        n = dead_letters.num_rows
        _append_pack(packs, dead_letters, np.zeros(0, np.int32), np.zeros(1, np.int32), np.zeros(n, bool))
    return pa.Table.from_arrays(
        [
            _list_array(packs[name], field.type.value_type)
            for name, field in zip(PACK_SCHEMA.names, PACK_SCHEMA, strict=True)
        ],
        schema=PACK_SCHEMA,
    )


def _append_pack(packs, rows: pa.Table, flat, cu_seqlens, truncated, sequences_per_doc=None, spans=None) -> None:
    empty = np.zeros(0, np.int64)
    packs["input_ids"].append(flat)
    packs["cu_seqlens"].append(cu_seqlens)
    packs["truncated"].append(truncated)
    if sequences_per_doc is None:  # one sequence per document; none for dead letters (a pack with no tokens)
        sequences_per_doc = np.full(rows.num_rows, 0 if len(cu_seqlens) == 1 else 1, np.int32)
    packs["sequences_per_doc"].append(sequences_per_doc)
    packs["char_start"].append(empty if spans is None else spans[0])
    packs["char_end"].append(empty if spans is None else spans[1])
    for name in PER_DOC_FIELDS:
        packs[name].append(rows.column(name))


def _list_array(parts: list, value_type: pa.DataType) -> pa.ListArray:
    values = [pa.array(p, value_type) if not isinstance(p, pa.ChunkedArray) else p.combine_chunks() for p in parts]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = pa.concat_arrays(values) if values else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)
