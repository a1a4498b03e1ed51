"""NeoBERT in plain PyTorch, in one file: config, encoder blocks, the element-wise math and RoPE.

The forward pass works on one flat stream of tokens holding several documents back to back,
described by `cu_seqlens` (cumulative document lengths). Linear layers see every real token once
and no padding; attention is confined to each document by the chosen attention backend.

Shapes: T tokens of a packed stream, N documents, C = hidden size, H heads of D = C / H, F = SwiGLU
width. The element-wise steps between the matmuls (RMSNorm, RoPE, the SwiGLU gate, residual adds) are
free functions, run eagerly, or each fused into one kernel by torch.compile (`compile_elementwise`):
on a GPU they, not the matmuls, take most of a forward pass of the 768-wide model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import AttentionFn


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
        # first use, so that a model constructed on the meta device (weights.py) gets a real one.
        self._rope_rotations: torch.Tensor | None = None
        self.ops: ElementwiseOps = EAGER

    def rope_rotations(self, device: torch.device) -> torch.Tensor:
        """The complex64 RoPE table (max_length, D/2), on device."""
        if self._rope_rotations is None:
            config = self.config
            self._rope_rotations = rope_rotations(config.head_dim, config.max_length, config.rope_theta)
        if self._rope_rotations.device != device:
            self._rope_rotations = self._rope_rotations.to(device)
        return self._rope_rotations

    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention: AttentionFn
    ) -> torch.Tensor:
        """input_ids (T,) for documents back to back; cu_seqlens (N+1,) int32 -> hidden (T, C)."""
        if max_seqlen > self.config.max_length:
            raise ValueError(f"a document of {max_seqlen} tokens exceeds max_length {self.config.max_length}")
        positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])  # (T,), restart per document
        rotations = torch.view_as_real(self.rope_rotations(input_ids.device)[positions])  # (T, D/2, 2)
        x = self.tok_embeddings(input_ids)  # (T, C)
        for layer in self.layers:
            x = layer(x, rotations, cu_seqlens, max_seqlen, attention, self.ops)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps)

    def compile_elementwise(self) -> None:
        """Fuse the element-wise steps with torch.compile; the kernels are built on first use."""
        self.ops = compiled_ops()

    def compile_blocks(self) -> None:
        """Compile each encoder block whole (matmuls and the element-wise steps between them) for any
        number of tokens; an attention call torch.compile cannot trace runs as it is, between two
        compiled pieces. Not the default: kept or dropped by measuring it on a GPU (benchmarks/gpu.sh)."""
        # RoPE in real arithmetic inside the compiled graph: inductor generates no code for complex ops.
        self.ops = ElementwiseOps("in compiled blocks", rms_norm, add_rms_norm, _heads_with(rope_real), silu_mul)
        for layer in self.layers:
            layer.compile(dynamic=True)


class EncoderBlock(nn.Module):
    """Pre-norm block: x + wo(attn(rmsnorm(x))), then x + w3(silu(x1) * x2) with x1, x2 = w12(rmsnorm(x))."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
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
        ops: ElementwiseOps,
    ) -> torch.Tensor:
        T, C = x.shape
        h = ops.rms_norm(x, self.attention_norm.weight, self.attention_norm.eps)  # (T, C)
        q, k, v = ops.heads_with_rope(self.qkv(h), rotations, self.n_heads)  # (T, H, D) each
        attn = attention(q, k, v, cu_seqlens, max_seqlen)  # (T, H, D), within each document
        x, h = ops.add_rms_norm(x, self.wo(attn.reshape(T, C)), self.ffn_norm.weight, self.ffn_norm.eps)
        return x + self.ffn.w3(ops.silu_mul(self.ffn.w12(h)))  # (T, 2F) -> (T, F) -> (T, C)


class SwiGLU(nn.Module):
    """The FFN's weights: w12 (C -> 2F) holds x1 and x2 side by side, w3 (F -> C); see EncoderBlock."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)


class RMSNorm(nn.Module):
    """An RMSNorm's weight and epsilon; the math is rms_norm below."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


# The element-wise math between the matmuls, as free functions: eager, or compiled in compiled_ops().


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in float32 whatever the activation dtype; (T, C) -> (T, C)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope_complex(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) as complex numbers (LLaMA style), in float32.

    x (T, H, D); rotations (T, D/2, 2) as cos, sin. One complex multiply instead of a handful of
    element-wise passes over (T, H, D): the fastest eager form.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (T, H, D/2)
    turn = torch.view_as_complex(rotations)[:, None, :]  # (T, 1, D/2)
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def rope_real(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The same rotation in real arithmetic, which torch.compile fuses (it does not fuse complex)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (T, H, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = rotations[:, None, :, 0], rotations[:, None, :, 1]  # (T, 1, D/2)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


def _heads_with(rope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    def heads_with_rope(qkv: torch.Tensor, rotations: torch.Tensor, heads: int):
        """qkv (T, 3C) -> q, k, v (T, H, D) contiguous, q and k rotated."""
        T = qkv.shape[0]
        # The checkpoint interleaves q, k, v per head: (T, H, 3*D), split on the last axis.
        q, k, v = qkv.view(T, heads, -1).chunk(3, dim=-1)
        return rope(q, rotations).contiguous(), rope(k, rotations).contiguous(), v.contiguous()

    return heads_with_rope


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: (T, 2F) -> silu(first half) * second half (T, F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one (T, F) buffer fewer


@dataclass(frozen=True)
class ElementwiseOps:
    """One implementation of each element-wise step of an encoder block."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    heads_with_rope: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


EAGER = ElementwiseOps("eager", rms_norm, add_rms_norm, _heads_with(rope_complex), silu_mul)


def compiled_ops() -> ElementwiseOps:
    """The same functions, each one torch.compile'd kernel for any number of tokens (dynamic shapes).

    Kernels are built on first use (Triton on GPU, C++ on CPU) and cached on disk by PyTorch.
    """

    def compiled(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    return ElementwiseOps(
        "compiled", compiled(rms_norm), compiled(add_rms_norm), compiled(_heads_with(rope_real)), compiled(silu_mul)
    )


def rope_rotations(head_dim: int, max_length: int, theta: float) -> torch.Tensor:
    """exp(i * position * frequency) as complex64, (max_length, D/2)."""
    cpu = torch.device("cpu")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(max_length, dtype=torch.float32, device=cpu), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token within its own document: 0..len-1 for each document in turn."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)
