"""Token-budget batching: pure functions over token lengths, no model and no Ray."""

from __future__ import annotations

import numpy as np


def plan_batches(
    lengths: np.ndarray, max_tokens: int, *, padded: bool = False, max_rows: int | None = None
) -> list[np.ndarray]:
    """Group document indices into batches of at most max_tokens tokens (and max_rows documents),
    longest documents first.

    A batch costs the sum of its lengths when unpadded, or rows x longest when padded (as a dense
    kernel would compute it). A document longer than max_tokens gets a batch of its own. Every
    index appears in exactly one batch; within a batch, lengths are non-increasing.
    """
    if max_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError(f"max_tokens and max_rows must be positive, got {max_tokens} and {max_rows}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    total = 0
    for position, index in enumerate(order):
        length = int(lengths[index])
        if padded:
            # Sorted descending: the first row of the batch is its longest.
            cost = int(lengths[order[start]]) * (position - start + 1)
        else:
            cost = total + length
        full = max_rows is not None and position - start >= max_rows
        if position > start and (cost > max_tokens or full):
            batches.append(order[start:position])
            start, total = position, length
        else:
            total += length
    if start < len(order):
        batches.append(order[start:])
    return batches


def pack_token_ids(token_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents into one int32 stream and their cumulative lengths (N+1,) int32."""
    cu_seqlens = cu_seqlens_from_lengths(np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids)))
    flat = np.concatenate(token_ids).astype(np.int32, copy=False) if token_ids else np.zeros(0, np.int32)
    return flat, cu_seqlens


def cu_seqlens_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """[0, l0, l0+l1, ...] as int32, the layout varlen attention kernels expect."""
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return cu_seqlens


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray], *, padded: bool) -> float:
    """Fraction of computed token slots that are padding (0 for unpadded batches)."""
    lengths = np.asarray(lengths)
    real = int(lengths.sum())
    if not padded or real == 0:
        return 0.0
    computed = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / computed
