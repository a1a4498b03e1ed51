"""Progress a person can plan by: rows and tokens of a known or estimated total, a windowed rate, an ETA."""

from __future__ import annotations

import pytest

from pipeline.progress import ProgressCounters, RateWindow, estimate_progress, progress_line
from pipeline.terminal import ProgressDisplay


def snapshot(**changes) -> dict:
    counters = ProgressCounters(total_shards=4, total_bytes=4000, rows_per_byte_guess=0.01)
    return {**counters.snapshot(), "elapsed_s": 100.0, **changes}


def test_before_any_shard_is_read_the_total_comes_from_the_sample_and_the_eta_from_the_rate():
    progress = estimate_progress(snapshot(documents=10, tokens=1000), tokens_per_s=50.0)
    assert (progress.rows_total, progress.rows_total_known) == (40, False)
    assert progress.tokens_total == 4000 and progress.eta_s == pytest.approx(60.0)
    assert progress_line(progress) == "10 of ~40 rows (25%), 1,000 of ~4,000 tokens, 50 tok/s, ETA 1m00s"


def test_shards_read_replace_the_guess_and_reading_all_of_them_gives_the_count():
    partly = estimate_progress(snapshot(shards_read=1, bytes_read=1000, rows_in_shards_read=20), 0.0)
    assert partly.rows_total == 80 and partly.eta_s is None
    done_before = snapshot(shards_read=4, bytes_read=4000, rows_in_shards_read=90, rows_done_before=10)
    counted = estimate_progress({**done_before, "documents": 70, "dead_letters": 10, "tokens": 800}, 100.0)
    assert (counted.rows_total, counted.rows_total_known, counted.fraction) == (80, True, 1.0)
    assert progress_line(counted) == "80 of 80 rows (100%), 10 dead-lettered, 800 tokens, 100 tok/s, ETA 0s"


def test_nothing_known_says_so():
    progress = estimate_progress(snapshot(rows_per_byte_guess=None, documents=5, tokens=50), 10.0)
    assert progress.rows_total is None and progress.eta_s is None
    assert "5 rows (of a total not known until a shard is read to its end)" in progress_line(progress)


def test_the_rate_follows_the_last_minute_not_the_average_since_start():
    window = RateWindow(window_s=60.0)
    assert window.add(10.0, 0) == 0.0  # start-up: nothing embedded yet
    window.add(70.0, 600)
    assert window.add(130.0, 6600) == pytest.approx(100.0)  # (6600 - 600) / 60 s
    assert window.add(190.0, 6600) == pytest.approx(0.0)  # stalled for the last minute


def test_the_display_prints_lines_when_not_interactive_and_a_bar_when_it_is(capsys):
    progress = estimate_progress(snapshot(documents=10, tokens=1000), tokens_per_s=50.0)
    ProgressDisplay(interactive=False)(progress)
    assert capsys.readouterr().out == f"progress: {progress_line(progress)}\n"
    bar = ProgressDisplay(interactive=True)
    bar(progress)
    bar.close()
    shown = capsys.readouterr()
    assert shown.out == "" and "10/40 rows, 50 tok/s, ETA 1m00s" in shown.err
