"""Pooling per document of a packed stream of hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.embedding_defaults import POOLINGS


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden (T, C) of documents back to back -> (N, C) float32, one vector per document."""
    starts = cu_seqlens[:-1].long()
    if mode == "cls":
        return hidden[starts].float()
    if mode == "last":
        return hidden[cu_seqlens[1:].long() - 1].float()
    if mode not in POOLINGS:
        raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLINGS)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # output_size given: no wait for the GPU to learn how many tokens there are (a host sync per pack)
    doc_of_token = torch.repeat_interleave(
        torch.arange(len(lengths), device=hidden.device), lengths, output_size=hidden.shape[0]
    )  # (T,)
    reduced = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    if mode == "max":
        index = doc_of_token.unsqueeze(1).expand(-1, hidden.shape[1])  # (T, C)
        return reduced.scatter_reduce_(0, index, hidden.float(), "amax", include_self=False)
    reduced.index_add_(0, doc_of_token, hidden.float())
    divisor = lengths.clamp(min=1).float()
    return reduced / (divisor.sqrt() if mode == "mean_sqrt_len" else divisor).unsqueeze(1)


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), p=2, dim=-1)
