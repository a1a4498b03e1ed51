"""NeoBERT in plain PyTorch: config, encoder blocks and RoPE, for packed (unpadded) token streams.

The forward pass works on one flat stream of tokens holding several documents back to back,
described by `cu_seqlens` (cumulative document lengths). Linear layers see every real token once
and no padding; attention is confined to each document by the chosen attention backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.model.attention import AttentionFn
from pipeline.model.elementwise import EAGER, ElementwiseOps, compiled_ops, rms_norm, silu_mul


@dataclass(frozen=True)
class NeoBERTConfig:
    """Sizes of a NeoBERT encoder; defaults are those of the released chandar-lab/NeoBERT."""

    hidden_size: int = 768
    """Width of the residual stream."""
    num_hidden_layers: int = 28
    """Number of encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads per block; head_dim = hidden_size / heads."""
    intermediate_size: int = 3072
    """Nominal FFN size; SwiGLU uses 2/3 of it, rounded up to a multiple of 8."""
    vocab_size: int = 30522
    """Rows of the token embedding (bert-base-uncased WordPiece)."""
    max_length: int = 4096
    """Longest document, in tokens, the checkpoint was trained for."""
    norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row is never trained."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: int(2/3 * intermediate_size) rounded up to a multiple of 8 (2048 released)."""
        multiple_of = 8
        size = int(2 * self.intermediate_size / 3)
        return multiple_of * ((size + multiple_of - 1) // multiple_of)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> NeoBERTConfig:
        """Build from a checkpoint's config.json, ignoring keys that do not change the math."""
        model_type = raw.get("model_type")
        if model_type != "neobert":
            raise ValueError(
                f'config.json has model_type {model_type!r}, expected "neobert"; '
                "is --model pointing at a NeoBERT checkpoint?"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents in the released checkpoint's vocabulary."""
        return {
            **dataclasses.asdict(self),
            "model_type": "neobert",
            "architectures": ["NeoBERTLMHead"],
        }


# Named sizes: the released model, and a tiny one that CPU tests and the offline demo use.
PRESETS: dict[str, NeoBERTConfig] = {
    "neobert": NeoBERTConfig(),
    "tiny": NeoBERTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_length=512
    ),
    "small": NeoBERTConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_length=4096
    ),
}


class NeoBERT(nn.Module):
    """The bare encoder: token ids of a packed stream in, final hidden states out."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        # Not a buffer: Module.to(dtype) would drop the imaginary part, or round it to bf16. Built on
        # first use, so that a model constructed on the meta device (checkpoint.py) gets a real one.
        self._rope_rotations: torch.Tensor | None = None
        self.ops: ElementwiseOps = EAGER

    def rope_rotations(self, device: torch.device) -> torch.Tensor:
        """The complex64 RoPE table (max_length, head_dim/2), on device."""
        if self._rope_rotations is None:
            config = self.config
            self._rope_rotations = rope_rotations(config.head_dim, config.max_length, config.rope_theta)
        if self._rope_rotations.device != device:
            self._rope_rotations = self._rope_rotations.to(device)
        return self._rope_rotations

    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention: AttentionFn
    ) -> torch.Tensor:
        """input_ids (T,) for documents back to back; cu_seqlens (N+1,) int32 -> hidden (T, hidden_size)."""
        if max_seqlen > self.config.max_length:
            raise ValueError(f"a document of {max_seqlen} tokens exceeds max_length {self.config.max_length}")
        positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])  # (T,), restart per document
        rotations = torch.view_as_real(self.rope_rotations(input_ids.device)[positions])  # (T, head_dim/2, 2)
        x = self.tok_embeddings(input_ids)  # (T, C)
        for layer in self.layers:
            x = layer(x, rotations, cu_seqlens, max_seqlen, attention, self.ops)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps)

    def compile_elementwise(self) -> None:
        """Fuse the element-wise steps with torch.compile (see elementwise.py); built on first use."""
        self.ops = compiled_ops()


class EncoderBlock(nn.Module):
    """Pre-norm block: x + wo(attn(norm(x))), then x + ffn(norm(x))."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rotations: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        attention: AttentionFn,
        ops: ElementwiseOps = EAGER,
    ) -> torch.Tensor:
        T, C = x.shape
        h = ops.rms_norm(x, self.attention_norm.weight, self.attention_norm.eps)
        q, k, v = ops.heads_with_rope(self.qkv(h), rotations, self.n_heads)  # (T, H, D) each
        attn = attention(q, k, v, cu_seqlens, max_seqlen)  # (T, H, D)
        x, h = ops.add_rms_norm(x, self.wo(attn.reshape(T, C)), self.ffn_norm.weight, self.ffn_norm.eps)
        return x + self.ffn.w3(ops.silu_mul(self.ffn.w12(h)))


class SwiGLU(nn.Module):
    """w3(silu(x1) * x2) with x1, x2 the halves of one fused w12 projection."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(silu_mul(self.w12(x)))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_rotations(head_dim: int, max_length: int, theta: float) -> torch.Tensor:
    """exp(i * position * frequency) as complex64, (max_length, head_dim/2)."""
    cpu = torch.device("cpu")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(max_length, dtype=torch.float32, device=cpu), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token within its own document: 0..len-1 for each document in turn."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)
