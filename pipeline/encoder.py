"""`Encoder`: texts in, one embedding per text out, rows in input order.

NeoBERT runs on the native model with unpadded attention; any other checkpoint runs through
transformers, on the same length-sorted batches, padded only to the longest document of a batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.batching import pack_token_ids, plan_batches
from pipeline.model.attention import AttentionFn, select_attention
from pipeline.model.checkpoint import NEOBERT, load_neobert, resolve_checkpoint, weights_sha256
from pipeline.model.embedding_defaults import EmbeddingDefaults, resolve_embedding_defaults
from pipeline.model.pooling import POOLINGS, l2_normalize, pool
from pipeline.model.transformers_encoder import load_transformers_encoder
from pipeline.tokenizer import TextTokenizer, TokenizedTexts

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
# Tokens per forward pass: large enough to keep matmuls efficient, small enough for memory.
DEFAULT_MAX_TOKENS = {"cpu": 8192, "cuda": 65536}


class CompileError(RuntimeError):
    """torch.compile could not build the fused kernels on this machine (--compile)."""


@dataclass(frozen=True)
class EncoderInfo:
    """What produced the embeddings: written into every run record."""

    source: str
    family: str
    weights_sha256: str
    hidden_size: int
    max_length: int
    device: str
    dtype: str
    attention: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


class Encoder:
    """A loaded encoder with its tokenizer and default pooling; encode() is the whole public contract."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        *,
        attention: tuple[str, AttentionFn | None],
        info: EncoderInfo,
        defaults: EmbeddingDefaults,
        max_tokens: int,
    ) -> None:
        self.model = model  # forward(ids (T,), cu_seqlens (N+1,), max_seqlen, attention) -> (T, C)
        self.tokenizer = tokenizer
        self.attention_name, self._attention = attention
        self.info = info
        self.defaults = defaults
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
        compile fuses NeoBERT's element-wise steps with torch.compile (elementwise.py); the kernels are
        built here, on a two-document pack, so a machine that cannot build them fails at load time.
        """
        torch_device = resolve_device(device)
        dtype = dtype or ("bfloat16" if torch_device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        folder = resolve_checkpoint(
            name_or_path, revision=revision, cache_dir=cache_dir, storage_options=storage_options
        )
        defaults = resolve_embedding_defaults(folder, pooling=pooling, normalize=normalize, max_length=max_length)
        if defaults.family == NEOBERT:
            loaded = load_neobert(folder, torch_device, DTYPES[dtype])
            model, digest, hidden_size = loaded.model, loaded.weights_sha256, loaded.config.hidden_size
            chosen = select_attention(attention, torch_device, DTYPES[dtype])
            if compile:
                model.compile_elementwise()
        else:
            if attention != "auto":
                raise ValueError(f"--attention {attention} applies to NeoBERT; other models use transformers' own")
            if compile:
                raise ValueError("--compile applies to NeoBERT; other models run transformers' own modules")
            model = load_transformers_encoder(folder, torch_device, DTYPES[dtype])
            digest, hidden_size = weights_sha256(folder), model.hidden_size
            chosen = (f"transformers-{model.attention_implementation}", None)
        tokenizer = TextTokenizer.from_folder(
            Path(folder), defaults.max_length, neobert=defaults.family == NEOBERT, lowercase=defaults.lowercase
        )
        info = EncoderInfo(
            source=name_or_path if revision is None else f"{name_or_path}@{revision}",
            family=defaults.family,
            weights_sha256=digest,
            hidden_size=hidden_size,
            max_length=defaults.max_length,
            device=torch_device.type,
            dtype=dtype,
            attention=chosen[0],
        )
        log.info("loaded %s (%s, %s, attention=%s)", info.source, info.device, dtype, chosen[0])
        encoder = cls(
            model,
            tokenizer,
            attention=chosen,
            info=info,
            defaults=defaults,
            max_tokens=max_tokens or max(DEFAULT_MAX_TOKENS[torch_device.type], defaults.max_length),
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
        return self.info.hidden_size

    @property
    def pads_batches(self) -> bool:
        """Whether a batch is padded to its longest document (transformers models) or run unpadded."""
        return self.info.family != NEOBERT

    def tokenize(self, texts: list[str]) -> TokenizedTexts:
        return self.tokenizer.encode(texts)

    def encode(
        self,
        texts: list[str],
        pooling: str | None = None,
        normalize: bool | None = None,
        *,
        max_tokens: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """(len(texts), hidden_size) embeddings, row i for texts[i], whatever the internal batching.

        pooling and normalize left None follow the checkpoint (encoder.defaults).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        tokenized = self.tokenize(list(texts))
        return self.embed_token_ids(tokenized.ids, pooling, normalize, max_tokens=max_tokens, output_dtype=output_dtype)

    def embed_token_ids(
        self,
        token_ids: list[np.ndarray],
        pooling: str | None = None,
        normalize: bool | None = None,
        *,
        max_tokens: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """Embed already tokenized documents in length-sorted token-budget batches; input order kept."""
        out = np.zeros((len(token_ids), self.hidden_size), dtype=OUTPUT_DTYPES[output_dtype])
        lengths = np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids))
        for batch in plan_batches(lengths, max_tokens or self.max_tokens):
            flat, cu_seqlens = pack_token_ids([token_ids[i] for i in batch])
            out[batch] = self.embed_packed(flat, cu_seqlens, pooling, normalize)
        return out

    @torch.inference_mode()
    def embed_packed(
        self, flat_ids: np.ndarray, cu_seqlens: np.ndarray, pooling: str | None = None, normalize: bool | None = None
    ) -> np.ndarray:
        """One forward pass over documents laid back to back: (T,) ids, (N+1,) offsets -> (N, C) float32."""
        pooling = self.defaults.pooling if pooling is None else pooling
        normalize = self.defaults.normalize if normalize is None else normalize
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
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
