"""Token-budget batching as pure functions, checked as properties over arbitrary lengths."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batching import cu_seqlens_from_lengths, pack_token_ids, padding_waste, plan_batches

lengths_strategy = st.lists(st.integers(min_value=1, max_value=600), max_size=200)


@given(lengths_strategy, st.integers(min_value=1, max_value=2048), st.booleans())
def test_every_document_lands_in_exactly_one_batch(lengths, max_tokens, padded):
    batches = plan_batches(np.array(lengths), max_tokens, padded=padded)
    assert sorted(np.concatenate(batches).tolist() if batches else []) == list(range(len(lengths)))


@given(lengths_strategy, st.integers(min_value=1, max_value=2048), st.booleans())
def test_batches_respect_the_budget_unless_one_document_is_larger(lengths, max_tokens, padded):
    lengths = np.array(lengths)
    for batch in plan_batches(lengths, max_tokens, padded=padded):
        cost = lengths[batch].max() * len(batch) if padded else lengths[batch].sum()
        assert cost <= max_tokens or len(batch) == 1
        assert (np.diff(lengths[batch]) <= 0).all()  # longest first


@given(lengths_strategy, st.integers(min_value=1, max_value=2048), st.integers(min_value=1, max_value=20))
def test_max_rows_caps_every_batch_and_loses_nothing(lengths, max_tokens, max_rows):
    batches = plan_batches(np.array(lengths), max_tokens, max_rows=max_rows)
    assert all(len(b) <= max_rows for b in batches)
    assert sorted(np.concatenate(batches).tolist() if batches else []) == list(range(len(lengths)))


def test_budget_is_filled_greedily():
    batches = plan_batches(np.array([3, 5, 2, 5, 1]), max_tokens=10)
    assert [b.tolist() for b in batches] == [[1, 3], [0, 2, 4]]


def test_padded_cost_counts_rows_times_longest():
    lengths = np.array([10, 1, 1, 1])
    assert [len(b) for b in plan_batches(lengths, 20, padded=True)] == [2, 2]
    assert [len(b) for b in plan_batches(lengths, 20, padded=False)] == [4]


def test_pack_concatenates_and_offsets():
    flat, cu_seqlens = pack_token_ids([np.array([101, 5, 102]), np.array([101, 102])])
    assert flat.tolist() == [101, 5, 102, 101, 102] and flat.dtype == np.int32
    assert cu_seqlens.tolist() == [0, 3, 5] and cu_seqlens.dtype == np.int32


def test_cu_seqlens_of_nothing_is_a_single_zero():
    assert cu_seqlens_from_lengths(np.array([], dtype=np.int64)).tolist() == [0]


def test_padding_waste():
    lengths = np.array([4, 2, 2])
    assert padding_waste(lengths, [np.array([0, 1, 2])], padded=True) == 1 - 8 / 12
    assert padding_waste(lengths, [np.array([0, 1, 2])], padded=False) == 0.0
