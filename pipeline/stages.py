"""The pipeline's stages as plain callables over Arrow tables; Ray only wires them (see job.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.encoder import Encoder
from pipeline.faults import failpoint
from pipeline.tokenizer import TextTokenizer

# One row per pack: documents laid back to back, ready for one forward pass.
PACK_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("cu_seqlens", pa.list_(pa.int32())),
        ("id", pa.list_(pa.string())),
        ("shard", pa.list_(pa.string())),
        ("row", pa.list_(pa.int64())),
        ("truncated", pa.list_(pa.bool_())),
    ]
)


def output_schema(hidden_size: int, output_dtype: str) -> pa.Schema:
    """One row per document in the output Parquet."""
    element = pa.float16() if output_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("embedding", pa.list_(element, hidden_size)),
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            ("shard", pa.string()),
            ("row", pa.int64()),
        ]
    )


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, max_length: int) -> TextTokenizer:
    # Built once per worker process, then reused by every task that lands there.
    return TextTokenizer(Tokenizer.from_str(tokenizer_json), max_length)


def tokenize_and_pack(rows: pa.Table, *, tokenizer_json: str, max_length: int, tokens_per_batch: int) -> pa.Table:
    """Tokenize a batch of rows, sort by length and cut into token-budget packs (one output row each)."""
    tokenizer = _tokenizer(tokenizer_json, max_length)
    tokenized = tokenizer.encode(rows.column("text").to_pylist())
    ids, shards, row_numbers = (rows.column(name) for name in ("id", "shard", "row"))
    packs: dict[str, list] = {name: [] for name in PACK_SCHEMA.names}
    for members in plan_batches(tokenized.lengths, tokens_per_batch):
        flat, cu_seqlens = pack_token_ids([tokenized.ids[i] for i in members])
        take = pa.array(members)
        packs["input_ids"].append(flat)
        packs["cu_seqlens"].append(cu_seqlens)
        packs["id"].append(ids.take(take))
        packs["shard"].append(shards.take(take))
        packs["row"].append(row_numbers.take(take))
        packs["truncated"].append(tokenized.truncated[members])
    return pa.Table.from_arrays(
        [
            _list_array(packs[name], field.type.value_type)
            for name, field in zip(PACK_SCHEMA.names, PACK_SCHEMA, strict=True)
        ],
        schema=PACK_SCHEMA,
    )


def _list_array(parts: list, value_type: pa.DataType) -> pa.ListArray:
    values = [pa.array(p, value_type) if not isinstance(p, pa.ChunkedArray) else p.combine_chunks() for p in parts]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = pa.concat_arrays(values) if values else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


class EmbedStage:
    """Holds one model copy (one per actor) and embeds packs into output rows."""

    def __init__(
        self,
        model: str,
        *,
        pooling: str,
        normalize: bool,
        output_dtype: str,
        on_batch_done: Callable[[int, int], None] | None = None,
        torch_threads: int | None = None,
        **encoder_options,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(model, **encoder_options)
        self.pooling = pooling
        self.normalize = normalize
        self.output_dtype = output_dtype
        self.schema = output_schema(self.encoder.hidden_size, output_dtype)
        self.on_batch_done = on_batch_done

    def __call__(self, packs: pa.Table) -> pa.Table:
        tables = [self._embed_pack(packs.slice(i, 1)) for i in range(packs.num_rows)]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _embed_pack(self, pack: pa.Table) -> pa.Table:
        failpoint("embed")
        flat = pack.column("input_ids").chunk(0).flatten().to_numpy()
        cu_seqlens = pack.column("cu_seqlens").chunk(0).flatten().to_numpy()
        embeddings = self.encoder.embed_packed(flat, cu_seqlens, self.pooling, self.normalize)
        embeddings = embeddings.astype(np.float16 if self.output_dtype == "float16" else np.float32, copy=False)
        n_docs, hidden = embeddings.shape
        if self.on_batch_done is not None:
            self.on_batch_done(n_docs, int(cu_seqlens[-1]))
        return pa.Table.from_arrays(
            [
                pack.column("id").chunk(0).flatten(),
                pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), hidden),
                pa.array(np.diff(cu_seqlens).astype(np.int32)),
                pack.column("truncated").chunk(0).flatten(),
                pack.column("shard").chunk(0).flatten(),
                pack.column("row").chunk(0).flatten(),
            ],
            schema=self.schema,
        )
