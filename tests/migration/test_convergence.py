"""When pre-copy stops (avmm.migration.source): what is dirty must fit the downtime
budget at the rate the stream reaches, and a round that still halves the dirty set is
worth sending before the guest is paused — the downtime then carries only what one
more round could not shrink. A round too small to measure the stream keeps the last
rate estimate."""

from __future__ import annotations

import math

from avmm.migration.source import (
    RATE_MIN_BYTES,
    SMALL_ENOUGH_PAGES,
    _converged,
    _rate,
)

MB = 1_000_000
BUDGET_S = 0.3


def test_a_shrinking_dirty_set_gets_another_round() -> None:
    # 12 MiB dirty after round 0 at 300 MB/s fits 300 ms, but the next round (~40 ms)
    # would leave a tenth of it: not over yet.
    assert not _converged(3000, math.inf, 300 * MB, BUDGET_S)
    assert not _converged(3000, 30_000, 300 * MB, BUDGET_S)
    # The round after left a handful of pages: over.
    assert _converged(SMALL_ENOUGH_PAGES, 3000, 300 * MB, BUDGET_S)
    assert _converged(0, 3000, 0.0, BUDGET_S)


def test_a_set_that_no_longer_shrinks_ends_pre_copy_once_it_fits() -> None:
    # The guest dirties about as fast as the stream sends: more rounds do not help.
    assert _converged(3000, 3500, 300 * MB, BUDGET_S)
    # ... but only within the budget: 3000 pages at 10 MB/s is over a second.
    assert not _converged(3000, 3500, 10 * MB, BUDGET_S)
    assert not _converged(3000, 3500, 0.0, BUDGET_S)


def test_the_rate_comes_from_rounds_big_enough_to_measure_it() -> None:
    assert _rate(100 * MB, 0.5, 0.0) == 200 * MB
    # A few pages (or a round of zero pages) say nothing about the stream.
    assert _rate(RATE_MIN_BYTES - 1, 0.05, 200 * MB) == 200 * MB
    # With no estimate yet, even a small round's is better than none.
    assert _rate(1 * MB, 0.5, 0.0) == 2 * MB
    assert _rate(0, 0.0, 0.0) == 0.0
