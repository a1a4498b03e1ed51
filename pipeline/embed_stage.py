"""The model stage: one model copy per Ray actor, embedding packs into output rows."""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from pipeline.encoder import Encoder
from pipeline.faults import failpoint
from pipeline.io.schemas import ERROR_FIELDS, stream_schema
from pipeline.stages import LONG_DOCUMENTS, PACK_SCHEMA, PER_DOC_FIELDS


class ModelMismatchError(RuntimeError):
    """An actor loaded other weights than the ones the job's driver recorded."""


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
        expected_weights_sha256: str | None = None,
        **encoder_options,
    ) -> None:
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents must be one of {', '.join(LONG_DOCUMENTS)}, not {long_documents!r}")
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(model, **encoder_options)
        loaded = self.encoder.info.weights_sha256
        if expected_weights_sha256 is not None and loaded != expected_weights_sha256:
            # The run record pins the driver's digest: vectors from other weights must not join the output.
            raise ModelMismatchError(
                f"{model} on {platform.node()} holds weights with sha256 {loaded[:12]}..., but the job's "
                f"driver read {expected_weights_sha256[:12]}... (the digest in the run record); every node "
                "must load the same checkpoint: use a shared URL, or the same files at the same path everywhere"
            )
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
        out = {name: column[name] for name in PER_DOC_FIELDS} | {"truncated": column["truncated"]}
        for name in self.schema.names:
            if name not in out:
                out[name] = pa.nulls(n, self.schema.field(name).type)
        return pa.Table.from_arrays([out[name] for name in self.schema.names], schema=self.schema)
