"""A plain, obviously-correct NeoBERT written from DESIGN.md's checkpoint facts, for parity tests.

It reads the released tensor names directly (not through the pipeline's adapter), runs one
document at a time with dense attention, does RoPE with complex numbers, and computes in float64.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (L, H, D): rotate pairs (x[2i], x[2i+1]) by position * theta^(-2i/D)."""
    L, H, D = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(L, dtype=torch.float64), freqs)  # (L, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    as_complex = torch.view_as_complex(x.reshape(L, H, D // 2, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).reshape(L, H, D)


def reference_hidden_states(weights: dict[str, torch.Tensor], config: dict, token_ids: list[int]) -> torch.Tensor:
    """Last hidden state (L, C) of one document, from a released-layout state dict."""
    w = {k.removeprefix("model."): v.double() for k, v in weights.items()}
    eps, theta = config["norm_eps"], config.get("rope_theta", 10000.0)
    H = config["num_attention_heads"]
    C = config["hidden_size"]
    D = C // H
    L = len(token_ids)
    x = w["encoder.weight"][torch.tensor(token_ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer_encoder.{i}."
        h = rms_norm(x, w[p + "attention_norm.weight"], eps)
        qkv = (h @ w[p + "qkv.weight"].T).view(L, H, 3 * D)
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        q, k = rope_complex(q, theta), rope_complex(k, theta)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(L, C)
        x = x + attn @ w[p + "wo.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate_and_value = h @ w[p + "ffn.w12.weight"].T
        half = gate_and_value.shape[-1] // 2
        gate, value = gate_and_value[..., :half], gate_and_value[..., half:]
        x = x + (torch.nn.functional.silu(gate) * value) @ w[p + "ffn.w3.weight"].T
    return rms_norm(x, w["layer_norm.weight"], eps)
