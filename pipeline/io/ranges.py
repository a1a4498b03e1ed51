"""Row ranges: half-open [start, end) intervals of row numbers within one shard. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Range = tuple[int, int]


def rows_to_ranges(rows: Iterable[int]) -> list[Range]:
    """Sorted, merged ranges covering exactly the given row numbers (duplicates collapse)."""
    values = np.unique(np.fromiter(rows, dtype=np.int64))
    if len(values) == 0:
        return []
    breaks = np.nonzero(np.diff(values) != 1)[0]
    starts = np.concatenate([[values[0]], values[breaks + 1]])
    ends = np.concatenate([values[breaks], [values[-1]]]) + 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Union of ranges, sorted and with touching or overlapping ranges joined."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def overlaps(ranges: Iterable[Range]) -> list[Range]:
    """Row ranges covered more than once by the given ranges (empty when they are disjoint)."""
    doubled: list[Range] = []
    reach = None
    for start, end in sorted(ranges):
        if reach is not None and start < reach:
            doubled.append((start, min(end, reach)))
        reach = end if reach is None else max(reach, end)
    return merge_ranges(doubled)


def count_rows(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in ranges)


def contains(ranges: list[Range], row: int) -> bool:
    """Whether row lies in sorted, merged ranges."""
    lo, hi = 0, len(ranges)
    while lo < hi:
        mid = (lo + hi) // 2
        if ranges[mid][1] <= row:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(ranges) and ranges[lo][0] <= row


def missing(ranges: list[Range], total: int) -> list[Range]:
    """Rows of [0, total) not covered by sorted, merged ranges."""
    gaps, cursor = [], 0
    for start, end in ranges:
        if start > cursor:
            gaps.append((cursor, min(start, total)))
        cursor = max(cursor, end)
    if cursor < total:
        gaps.append((cursor, total))
    return [(s, e) for s, e in gaps if s < e]
