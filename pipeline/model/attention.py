"""Attention backends for packed token streams. Each one attends within each document only.

A backend is a function (q, k, v, cu_seqlens, max_seqlen) -> out, with q, k, v, out of shape
(T, heads, head_dim) for T tokens of documents laid back to back, and cu_seqlens (N+1,) int32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.errors import SettingsError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
AttentionName = Literal["auto", "varlen", "flash_attn", "sdpa"]


def sdpa_by_length_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Pure PyTorch: one SDPA call per run of consecutive documents of equal length, no padding.

    Length-sorted packs make those runs long, so short documents are batched together.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    run_start = 0
    n_docs = len(bounds) - 1
    while run_start < n_docs:
        length = bounds[run_start + 1] - bounds[run_start]
        run_end = run_start + 1
        while run_end < n_docs and bounds[run_end + 1] - bounds[run_end] == length:
            run_end += 1
        lo, hi = bounds[run_start], bounds[run_end]
        n = run_end - run_start
        if length:
            # (n*L, H, D) -> (n, H, L, D)
            qs, ks, vs = (t[lo:hi].view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(hi - lo, *q.shape[1:])
        run_start = run_end
    return out


def torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """PyTorch's own variable-length flash attention (CUDA, fp16/bf16)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def flash_attn_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """The flash-attn package's variable-length kernel (CUDA, fp16/bf16)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, causal=False)


BACKENDS: dict[str, AttentionFn] = {
    "varlen": torch_varlen,
    "flash_attn": flash_attn_varlen,
    "sdpa": sdpa_by_length_runs,
}


def available_attention(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run on this device and dtype, fastest first."""
    names = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("varlen")
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash_attn")
    names.append("sdpa")
    return names


def select_attention(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, AttentionFn]:
    """Resolve "auto" to the fastest available backend; refuse one that cannot run here."""
    available = available_attention(device, dtype)
    if name == "auto":
        name = available[0]
    if name not in BACKENDS:
        raise SettingsError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name not in available:
        raise SettingsError(
            f"attention backend {name!r} cannot run on {device.type} with {dtype}; "
            f"available here: {', '.join(available)}"
        )
    return name, BACKENDS[name]
