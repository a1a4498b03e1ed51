"""The pack stage: tokenize rows and cut them into token-budget packs, a plain callable over Arrow tables.

It imports no torch, so the Ray workers that run it stay light; packs.py is what it hands on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.stages.packs import Pack, dead_letter_pack, documents_pack, packs_to_table
from pipeline.tokenizer import TextTokenizer


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
    """Tokenize a batch of rows (the read stage's), sort by length and cut into token-budget packs.

    Rows that carry an error become one dead-letter pack. With chunking, a document's windows always
    share one pack, so its vectors are made together.
    """
    tokenizer = _tokenizer(tokenizer_json, max_length)
    is_error = pc.is_valid(rows.column("error"))
    dead_letters, rows = rows.filter(is_error), rows.filter(pc.invert(is_error))
    texts = rows.column("text").to_pylist()
    if long_documents == "truncate":
        packs = _truncated_packs(tokenizer, rows, texts, tokens_per_batch)
    else:
        packs = _chunked_packs(tokenizer, rows, texts, tokens_per_batch, chunk_overlap)
    if dead_letters.num_rows:
        packs.append(dead_letter_pack(dead_letters))
    return packs_to_table(packs)


def _truncated_packs(tokenizer: TextTokenizer, rows: pa.Table, texts: list[str], tokens_per_batch: int) -> list[Pack]:
    tokenized = tokenizer.encode(texts)
    packs = []
    for members in plan_batches(tokenized.lengths, tokens_per_batch):
        flat, cu_seqlens = pack_token_ids([tokenized.ids[i] for i in members])
        packs.append(documents_pack(rows.take(pa.array(members)), flat, cu_seqlens, tokenized.truncated[members]))
    return packs


def _chunked_packs(
    tokenizer: TextTokenizer, rows: pa.Table, texts: list[str], tokens_per_batch: int, overlap: int
) -> list[Pack]:
    chunks = tokenizer.chunk(texts, overlap)
    first = np.concatenate([[0], np.cumsum(chunks.chunks_per_text)])  # (docs + 1,) first window of each
    lengths = np.fromiter((len(c) for c in chunks.ids), np.int64, len(chunks.ids))
    doc_tokens = np.add.reduceat(lengths, first[:-1]) if len(texts) else np.zeros(0, np.int64)
    packs = []
    for members in plan_batches(doc_tokens, tokens_per_batch):
        windows = np.concatenate([np.arange(first[d], first[d + 1]) for d in members])
        flat, cu_seqlens = pack_token_ids([chunks.ids[w] for w in windows])
        packs.append(
            documents_pack(
                rows.take(pa.array(members)),
                flat,
                cu_seqlens,
                np.zeros(len(members), bool),
                chunks.chunks_per_text[members],
                (chunks.char_start[windows], chunks.char_end[windows]),
            )
        )
    return packs
