"""The pipeline's stages as plain callables over Arrow tables; Ray only wires them (see job.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.encoder import Encoder
from pipeline.faults import failpoint
from pipeline.io.schemas import ERROR_FIELDS, stream_schema
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
_PER_DOC = ("id", "shard", "row", *(name for name, _ in ERROR_FIELDS))


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
    for name in _PER_DOC:
        packs[name].append(rows.column(name))


def _list_array(parts: list, value_type: pa.DataType) -> pa.ListArray:
    values = [pa.array(p, value_type) if not isinstance(p, pa.ChunkedArray) else p.combine_chunks() for p in parts]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = pa.concat_arrays(values) if values else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


class EmbedStage:
    """Holds one model copy (one per actor) and embeds packs into output rows.

    on_batch_done(documents, tokens, tokens computed including padding) reports progress.
    """

    def __init__(
        self,
        model: str,
        *,
        pooling: str,
        normalize: bool,
        output_dtype: str,
        long_documents: str = "truncate",
        on_batch_done: Callable[[int, int, int], None] | None = None,
        torch_threads: int | None = None,
        **encoder_options,
    ) -> None:
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents must be one of {', '.join(LONG_DOCUMENTS)}, not {long_documents!r}")
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(model, **encoder_options)
        self.pooling = pooling
        self.normalize = normalize
        self.output_dtype = output_dtype
        self.long_documents = long_documents
        self.schema = stream_schema(self.encoder.hidden_size, output_dtype, chunks=long_documents == "chunk")
        self.on_batch_done = on_batch_done

    def __call__(self, packs: pa.Table) -> pa.Table:
        tables = [self._embed_pack(packs.slice(i, 1)) for i in range(packs.num_rows)]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _embed_pack(self, pack: pa.Table) -> pa.Table:
        failpoint("embed")
        column = {name: pack.column(name).chunk(0).flatten() for name in PACK_SCHEMA.names}
        flat, cu_seqlens = column["input_ids"].to_numpy(), column["cu_seqlens"].to_numpy()
        if len(cu_seqlens) == 1:
            return self._dead_letters(column)
        chunk_mean = self.long_documents == "chunk-mean"
        vectors = self._embed_sequences(flat, cu_seqlens, normalize=self.normalize and not chunk_mean)  # (S, C)
        lengths = np.diff(cu_seqlens).astype(np.int32)  # (S,)
        per_doc = column["sequences_per_doc"].to_numpy()
        first = np.concatenate([[0], np.cumsum(per_doc)[:-1]])  # (N,) first sequence of each document
        if chunk_mean:
            vectors = np.add.reduceat(vectors, first, axis=0) / per_doc[:, None]
            if self.normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            lengths = np.add.reduceat(lengths, first).astype(np.int32)
        vectors = vectors.astype(np.float16 if self.output_dtype == "float16" else np.float32, copy=False)
        n_docs, hidden = len(per_doc), vectors.shape[1]
        if self.on_batch_done is not None:
            tokens = int(cu_seqlens[-1])
            padded = len(cu_seqlens) - 1 if self.encoder.pads_batches else 0
            self.on_batch_done(n_docs, tokens, padded * int(np.diff(cu_seqlens).max()) if padded else tokens)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), hidden)
        n_tokens = pa.array(lengths)
        out = {name: column[name] for name in ("id", "truncated", "shard", "row")}
        if self.long_documents == "chunk":
            offsets = pa.array(np.concatenate([first, [len(lengths)]]).astype(np.int32))
            embedding, n_tokens = (pa.ListArray.from_arrays(offsets, values) for values in (embedding, n_tokens))
            out |= {name: pa.ListArray.from_arrays(offsets, column[name]) for name in ("char_start", "char_end")}
        out |= {"embedding": embedding, "n_tokens": n_tokens}
        out |= {name: pa.nulls(n_docs, kind) for name, kind in ERROR_FIELDS}
        return pa.Table.from_arrays([out[name] for name in self.schema.names], schema=self.schema)

    def _embed_sequences(self, flat: np.ndarray, cu_seqlens: np.ndarray, normalize: bool) -> np.ndarray:
        """(S, C) float32 vectors; a pack over the token budget (one long document's windows) is split."""
        if cu_seqlens[-1] <= self.encoder.max_tokens:
            return self.encoder.embed_packed(flat, cu_seqlens, self.pooling, normalize)
        sequences = [flat[a:b] for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
        return self.encoder.embed_token_ids(sequences, self.pooling, normalize)

    def _dead_letters(self, column: dict) -> pa.Table:
        """A pack of rows that could not be embedded: passed on with a null embedding and their reason."""
        n = len(column["id"])
        out = {name: column[name] for name in _PER_DOC} | {"truncated": column["truncated"]}
        for name in self.schema.names:
            if name not in out:
                out[name] = pa.nulls(n, self.schema.field(name).type)
        return pa.Table.from_arrays([out[name] for name in self.schema.names], schema=self.schema)
