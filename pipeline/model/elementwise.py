"""The element-wise math between NeoBERT's matmuls: eager, or fused into one kernel each by torch.compile.

On a GPU these passes, not the matmuls, take most of a forward pass of the 768-wide model: RMSNorm
and RoPE run in float32 for accuracy, and in eager mode each is a handful of kernels that read and
write the whole activation. Compiled, each function below reads its inputs once and writes its
outputs once. Eager stays the default: on CPU it needs no C++ compiler at run time, and there its
RoPE is one complex multiply, the fastest form PyTorch has without fusion.

Shapes: T tokens of a packed stream, C = hidden size, H heads of D = C / H, F = SwiGLU width.
`rotations` is the RoPE table gathered per token as real pairs (T, D/2, 2): cos, sin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ElementwiseOps:
    """One implementation of each element-wise step of an encoder block."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(x (T, C), weight (C,), eps) -> x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    """(x, delta, weight, eps) -> (x + delta, rms_norm(x + delta)): the residual add and the next norm."""
    heads_with_rope: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """(qkv (T, 3C) interleaved per head, rotations, H) -> q, k, v (T, H, D) contiguous, q and k rotated."""
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    """(T, 2F) -> silu(first half) * second half (T, F): SwiGLU's gate."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope_complex(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) as complex numbers (LLaMA style), in float32.

    x (T, H, D); rotations (T, D/2, 2). One complex multiply instead of a handful of element-wise
    passes over (T, H, D): the fastest eager form.
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
        T = qkv.shape[0]
        # The checkpoint interleaves q, k, v per head: (T, H, 3*D), split on the last axis.
        q, k, v = qkv.view(T, heads, -1).chunk(3, dim=-1)
        return rope(q, rotations).contiguous(), rope(k, rotations).contiguous(), v.contiguous()

    return heads_with_rope


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one (T, F) buffer fewer


EAGER = ElementwiseOps("eager", rms_norm, add_rms_norm, _heads_with(rope_complex), silu_mul)


def compiled_ops() -> ElementwiseOps:
    """Each step as one torch.compile'd kernel, for any number of tokens (dynamic shapes).

    Kernels are built on first use (Triton on GPU, C++ on CPU) and cached on disk by PyTorch.
    """

    def compiled(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    return ElementwiseOps(
        "compiled",
        compiled(rms_norm),
        compiled(add_rms_norm),
        compiled(_heads_with(rope_real)),
        compiled(silu_mul),
    )
