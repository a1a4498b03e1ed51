"""The embed stage: one model copy per Ray actor, embedding packs into output rows.

torch is imported by the actor that builds the stage, not by the driver that only names it in the graph.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.errors import ModelError, SettingsError
from pipeline.faults import failpoint
from pipeline.io.schemas import ERROR_FIELDS, stream_schema
from pipeline.stages.packs import LONG_DOCUMENTS, PER_DOC_FIELDS, Pack, table_to_packs


class ModelMismatchError(ModelError):
    """An actor loaded other weights than the ones the job's driver recorded."""


class EmbedStage:
    """Holds one model copy (one per actor) and embeds packs into output rows (io/schemas.stream_schema).

    on_batch_done(documents, dead letters, sequences, tokens, tokens computed including padding)
    reports progress after each pack.
    """

    def __init__(
        self,
        model: str,
        *,
        pooling: str,
        normalize: bool,
        output_dtype: str,
        long_documents: str = "truncate",
        on_batch_done: Callable[[int, int, int, int, int], None] | None = None,
        torch_threads: int | None = None,
        expected_weights_sha256: str | None = None,
        **encoder_options,
    ) -> None:
        if long_documents not in LONG_DOCUMENTS:
            raise SettingsError(f"long_documents must be one of {', '.join(LONG_DOCUMENTS)}, not {long_documents!r}")
        import torch

        from pipeline.encoder import Encoder

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(model, **encoder_options)
        loaded = self.encoder.facts.weights_sha256
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
        tables = [self._embed_pack(pack) for pack in table_to_packs(packs)]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _embed_pack(self, pack: Pack) -> pa.Table:
        failpoint("embed")
        if pack.dead_letters:
            self._report(pack, documents=0, tokens=0, padded=0)
            return self._dead_letters(pack)
        chunk_mean = self.long_documents == "chunk-mean"
        vectors = self._embed_sequences(pack, normalize=self.normalize and not chunk_mean)  # (S, C)
        lengths = np.diff(pack.cu_seqlens).astype(np.int32)  # (S,)
        # transformers models pad each pack to its longest sequence; NeoBERT computes no padding
        padded = len(lengths) * int(lengths.max()) if self.encoder.pads_batches else pack.tokens
        per_doc = pack.sequences_per_doc
        first = np.concatenate([[0], np.cumsum(per_doc)[:-1]])  # (N,) first sequence of each document
        if chunk_mean:
            vectors = np.add.reduceat(vectors, first, axis=0) / per_doc[:, None]
            if self.normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            lengths = np.add.reduceat(lengths, first).astype(np.int32)
        vectors = vectors.astype(np.float16 if self.output_dtype == "float16" else np.float32, copy=False)
        self._report(pack, documents=pack.n_docs, tokens=pack.tokens, padded=padded)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        n_tokens = pa.array(lengths)
        out = {name: pack.docs[name] for name in ("id", "shard", "row")} | {"truncated": pack.truncated}
        if self.long_documents == "chunk":
            offsets = pa.array(np.concatenate([first, [len(lengths)]]).astype(np.int32))
            embedding, n_tokens = (pa.ListArray.from_arrays(offsets, values) for values in (embedding, n_tokens))
            out |= {
                name: pa.ListArray.from_arrays(offsets, pa.array(values))
                for name, values in (("char_start", pack.char_start), ("char_end", pack.char_end))
            }
        out |= {"embedding": embedding, "n_tokens": n_tokens}
        out |= {name: pa.nulls(pack.n_docs, kind) for name, kind in ERROR_FIELDS}
        return pa.Table.from_arrays([out[name] for name in self.schema.names], schema=self.schema)

    def _embed_sequences(self, pack: Pack, normalize: bool) -> np.ndarray:
        """(S, C) float32 vectors; a pack over the token budget (one long document's windows) is split."""
        if pack.tokens <= self.encoder.max_tokens:
            return self.encoder.embed_packed(pack.input_ids, pack.cu_seqlens, self.pooling, normalize)
        bounds = pack.cu_seqlens
        sequences = [pack.input_ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return self.encoder.embed_token_ids(sequences, pooling=self.pooling, normalize=normalize)

    def _report(self, pack: Pack, *, documents: int, tokens: int, padded: int) -> None:
        if self.on_batch_done is not None:
            dead = 0 if documents else pack.n_docs
            self.on_batch_done(documents, dead, len(pack.cu_seqlens) - 1, tokens, padded)

    def _dead_letters(self, pack: Pack) -> pa.Table:
        """Rows that could not be embedded: passed on with a null embedding and their reason."""
        out = {name: pack.docs[name] for name in PER_DOC_FIELDS} | {"truncated": pack.truncated}
        for name in self.schema.names:
            if name not in out:
                out[name] = pa.nulls(pack.n_docs, self.schema.field(name).type)
        return pa.Table.from_arrays([out[name] for name in self.schema.names], schema=self.schema)
