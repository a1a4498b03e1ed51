"""`Encoder`: texts in, one embedding per text out, rows in input order.

NeoBERT runs on the native model with unpadded attention; any other checkpoint runs through
transformers, on the same length-sorted batches, padded only to the longest document of a batch.
`encode` takes what sentence-transformers' encode takes for the common cases (a string or a list,
batch_size, normalize_embeddings, show_progress_bar, convert_to_tensor).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.errors import SettingsError
from pipeline.model.attention import AttentionFn, select_attention
from pipeline.model.checkpoint import weights_sha256
from pipeline.model.devices import DEFAULT_MAX_TOKENS
from pipeline.model.embedding_defaults import POOLINGS
from pipeline.model.inspection import CheckpointFacts, inspect_checkpoint
from pipeline.model.pooling import l2_normalize, pool
from pipeline.tokenizer import TextTokenizer, TokenizedTexts

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


class CompileError(SettingsError):
    """torch.compile could not build the fused kernels on this machine (--compile)."""


def resolve_device(device: str) -> torch.device:
    """auto: the GPU where torch sees one, else the CPU; cuda with no GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device {device!r} requested but torch sees no CUDA GPU here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise SettingsError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N") from err


class Encoder:
    """A loaded encoder with its tokenizer and default pooling; encode() is the whole public contract."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        *,
        attention: tuple[str, AttentionFn | None],
        facts: CheckpointFacts,
        max_tokens: int,
    ) -> None:
        self.model = model  # forward(ids (T,), cu_seqlens (N+1,), max_seqlen, attention) -> (T, C)
        self.tokenizer = tokenizer
        self.attention_name, self._attention = attention
        self.facts = facts
        self.max_tokens = max_tokens
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str | None = None,
        attention: str = "auto",
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        max_tokens: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
        compile: bool = False,
    ) -> Encoder:
        """Load from a Hub id (e.g. chandar-lab/NeoBERT), a local folder or an fsspec URL (s3://...).

        dtype defaults to bfloat16 on GPU and float32 on CPU. pooling, normalize and max_length
        default to what the checkpoint declares (see embedding_defaults.py); max_length may not exceed
        the checkpoint's position limit. storage_options configure the fsspec filesystem of a URL.
        compile fuses NeoBERT's element-wise steps with torch.compile; the kernels are built here, on a
        two-document pack, so a machine that cannot build them fails at load time.
        """
        torch_device = resolve_device(device)
        facts = inspect_checkpoint(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            storage_options=storage_options,
            pooling=pooling,
            normalize=normalize,
            max_length=max_length,
            device=torch_device.type,
            dtype=dtype,
            digest=False,  # the loader below hashes the weights as it reads them (a digest remembered per file)
        )
        facts.refuse_native_options(attention, compile)
        if facts.compute_dtype not in DTYPES:
            raise SettingsError(f"dtype {facts.compute_dtype!r} is not one of {', '.join(DTYPES)}")
        torch_dtype = DTYPES[facts.compute_dtype]
        if facts.is_neobert:
            from pipeline.model.weights import load_neobert

            chosen = select_attention(attention, torch_device, torch_dtype)
            loaded = load_neobert(facts.folder, torch_device, torch_dtype)
            model, digest = loaded.model, loaded.weights_sha256
            if compile:
                model.compile_elementwise()
        else:
            from pipeline.model.transformers_encoder import load_transformers_encoder

            model = load_transformers_encoder(facts.folder, torch_device, torch_dtype)
            digest = weights_sha256(facts.folder)
            chosen = (f"transformers-{model.attention_implementation}", None)
        facts = dataclasses.replace(facts, weights_sha256=digest)
        tokenizer = TextTokenizer.from_folder(
            facts.folder, facts.max_length, neobert=facts.is_neobert, lowercase=facts.lowercase
        )
        log.info("loaded %s (%s, %s, attention=%s)", facts.source, torch_device, facts.compute_dtype, chosen[0])
        encoder = cls(
            model,
            tokenizer,
            attention=chosen,
            facts=facts,
            max_tokens=max_tokens or max(DEFAULT_MAX_TOKENS[torch_device.type], facts.max_length),
        )
        if compile:
            encoder._build_compiled_kernels()
        return encoder

    def _build_compiled_kernels(self) -> None:
        try:
            self.embed_packed(np.array([101, 102, 101, 7, 102], np.int64), np.array([0, 2, 5], np.int32))
        except Exception as err:  # torch.compile fails in many ways: no compiler, no Triton, an unsupported GPU
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CompileError(
                f"--compile: torch.compile could not build kernels on {self.device} "
                f"({type(err).__name__}: {reason[:300]}); run without --compile"
            ) from err

    @property
    def hidden_size(self) -> int:
        return self.facts.hidden_size

    @property
    def pads_batches(self) -> bool:
        """Whether a batch is padded to its longest document (transformers models) or run unpadded."""
        return not self.facts.is_neobert

    def tokenize(self, texts: list[str]) -> TokenizedTexts:
        return self.tokenizer.encode(texts)

    def encode(
        self,
        sentences: str | Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
        normalize_embeddings: bool = False,
        convert_to_tensor: bool = False,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_tokens: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray | torch.Tensor:
        """(len(sentences), hidden_size) embeddings, row i for sentences[i]; (hidden_size,) for one string.

        As in sentence-transformers: batch_size caps the texts per forward pass (the token budget
        max_tokens caps it too), normalize_embeddings=True L2-normalises on top of what the checkpoint
        does, show_progress_bar shows one, convert_to_tensor returns a torch tensor. pooling and
        normalize override the checkpoint's own choice (encoder.facts).
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        tokenized = self.tokenize(texts)
        normalize = True if normalize_embeddings else normalize
        vectors = self.embed_token_ids(
            tokenized.ids,
            pooling=pooling,
            normalize=normalize,
            max_tokens=max_tokens,
            max_rows=batch_size,
            output_dtype=output_dtype,
            show_progress_bar=show_progress_bar,
        )
        vectors = vectors[0] if single else vectors
        return torch.from_numpy(vectors) if convert_to_tensor else vectors

    def embed_token_ids(
        self,
        token_ids: list[np.ndarray],
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_tokens: int | None = None,
        max_rows: int | None = None,
        output_dtype: str = "float32",
        show_progress_bar: bool = False,
    ) -> np.ndarray:
        """Embed already tokenized documents in length-sorted token-budget batches; input order kept."""
        out = np.zeros((len(token_ids), self.hidden_size), dtype=OUTPUT_DTYPES[output_dtype])
        lengths = np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids))
        batches = plan_batches(lengths, max_tokens or self.max_tokens, max_rows=max_rows)
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Batches", unit="batch")
        for batch in batches:
            flat, cu_seqlens = pack_token_ids([token_ids[i] for i in batch])
            out[batch] = self.embed_packed(flat, cu_seqlens, pooling, normalize)
        return out

    @torch.inference_mode()
    def embed_packed(
        self, flat_ids: np.ndarray, cu_seqlens: np.ndarray, pooling: str | None = None, normalize: bool | None = None
    ) -> np.ndarray:
        """One forward pass over documents laid back to back: (T,) ids, (N+1,) offsets -> (N, C) float32."""
        pooling = self.facts.pooling if pooling is None else pooling
        normalize = self.facts.normalize if normalize is None else normalize
        if pooling not in POOLINGS:
            raise SettingsError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        lengths = np.diff(cu_seqlens)
        if len(lengths) == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        if lengths.min() < 1:
            raise ValueError("every document needs at least one token")
        ids = torch.from_numpy(np.array(flat_ids, dtype=np.int64)).to(self.device, non_blocking=True)
        cu = torch.from_numpy(np.array(cu_seqlens, dtype=np.int32)).to(self.device, non_blocking=True)
        hidden = self.model(ids, cu, int(lengths.max()), self._attention)  # (T, C)
        pooled = pool(hidden, cu, pooling)  # (N, C) float32
        if normalize:
            pooled = l2_normalize(pooled)
        return pooled.cpu().numpy()
