"""Pooling per document of a packed stream of hidden states."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["cls", "mean"]
POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden (T, C) of documents back to back -> (N, C): first token ([CLS]) or mean of all tokens."""
    starts = cu_seqlens[:-1].long()
    if mode == "cls":
        return hidden[starts]
    if mode == "mean":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, doc_of_token, hidden.float())
        return sums / lengths.clamp(min=1).unsqueeze(1)
    raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLINGS)}")


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), p=2, dim=-1)
