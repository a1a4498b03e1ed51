"""Row-range arithmetic behind resume and verify, as properties over arbitrary row sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.io.ranges import contains, count_rows, merge_ranges, missing, overlaps, rows_to_ranges

row_sets = st.sets(st.integers(min_value=0, max_value=300), max_size=120)


def expand(ranges):
    return [r for s, e in ranges for r in range(s, e)]


@given(row_sets)
def test_rows_to_ranges_round_trips(rows):
    ranges = rows_to_ranges(rows)
    assert expand(ranges) == sorted(rows)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:], strict=False))


@given(st.lists(row_sets, max_size=5))
def test_merge_is_the_union(row_sets_list):
    ranges = [r for rows in row_sets_list for r in rows_to_ranges(rows)]
    union = set().union(*row_sets_list) if row_sets_list else set()
    assert expand(merge_ranges(ranges)) == sorted(union)


@given(row_sets, row_sets)
def test_overlaps_are_the_rows_counted_twice(a, b):
    assert expand(overlaps(rows_to_ranges(a) + rows_to_ranges(b))) == sorted(a & b)


@given(row_sets, st.integers(min_value=0, max_value=320))
def test_missing_and_contains_agree(rows, total):
    ranges = rows_to_ranges(rows)
    assert expand(missing(ranges, total)) == [r for r in range(total) if r not in rows]
    assert all(contains(ranges, r) == (r in rows) for r in range(total + 5))
    assert count_rows(ranges) == len(rows)
