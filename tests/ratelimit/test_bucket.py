"""The token-bucket model, driven by a fake clock: every decision is predicted exactly."""

from __future__ import annotations

import pytest

from avmm.ratelimit import BucketConfig, RateLimitConfig, RateLimiter, Throttle, TokenBucket

MS = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def at_ms(self, ms: float) -> None:
        self.now = int(ms * MS)


def limiter(clock: FakeClock, *, ops: BucketConfig | None = None,
            bandwidth: BucketConfig | None = None) -> RateLimiter:
    return RateLimiter(RateLimitConfig(bandwidth=bandwidth, ops=ops), clock=clock)


def test_a_full_bucket_admits_its_size_then_one_token_per_refill_slice() -> None:
    clock = FakeClock()
    throttle = Throttle(limiter(clock, ops=BucketConfig(size=10, refill_ms=1000)))
    assert [throttle.admit(0) for _ in range(10)] == [0] * 10
    # Empty: one op refills in 1000 ms / 10.
    assert throttle.admit(0) == 100 * MS
    clock.at_ms(99.999999)
    assert throttle.admit(0) == 1
    clock.at_ms(100)
    assert throttle.admit(0) == 0
    assert throttle.admit(0) == 100 * MS
    assert throttle.admitted_ops == 11


#: (time ms, tokens, admitted?) scripts, with the bucket's size, refill_ms and burst
#: (also run through a group in shared memory: tests/ratelimit/test_shared_bucket.py).
SCRIPTS: list[tuple[list[tuple[float, int, bool]], int, int, int]] = [
    # (time ms, tokens, admitted?) against a hand-computed level.
    ([(0, 600, True), (0, 400, True), (0, 1, False), (250, 250, True), (250, 1, False),
      (1250, 1000, True), (1250, 1, False)], 1000, 1000, 0),
    # A request larger than the bucket waits for a full bucket, then leaves a debt.
    ([(0, 500, True), (0, 4000, False), (499, 4000, False), (500, 4000, True),
      (3500, 1, False), (3501, 1, True)], 1000, 1000, 0),
    # The burst is spent first; the bucket does not refill while it lasts.
    ([(0, 300, True), (0, 1000, True), (0, 1, False), (100, 100, True), (100, 1, False)],
     1000, 1000, 300),
    # Burst partly used, then a request straddling burst and bucket.
    ([(0, 200, True), (10, 1100, True), (10, 1, False), (20, 10, True), (20, 1, False)],
     1000, 1000, 300),
]


@pytest.mark.parametrize(("script", "size", "refill_ms", "burst"), SCRIPTS)
def test_a_scripted_sequence_is_admitted_as_the_model_says(
        script: list[tuple[float, int, bool]], size: int, refill_ms: int, burst: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(BucketConfig(size=size, refill_ms=refill_ms, one_time_burst=burst),
                         clock())
    admitted = []
    for at_ms, tokens, _ in script:
        clock.at_ms(at_ms)
        ok = bucket.wait_ns(tokens, clock()) == 0
        if ok:
            bucket.take(tokens, clock())
        admitted.append((at_ms, tokens, ok))
    assert admitted == script


def test_the_wait_returned_is_exactly_when_the_request_is_admitted() -> None:
    clock = FakeClock()
    bucket = TokenBucket(BucketConfig(size=3, refill_ms=7), clock())
    bucket.take(3, clock())
    wait = bucket.wait_ns(2, clock())
    # 2 tokens at 3 per 7 ms: 14/3 ms, rounded up to the nanosecond.
    assert wait == -(-14 * MS // 3)
    assert bucket.wait_ns(2, clock() + wait - 1) > 0
    assert bucket.wait_ns(2, clock() + wait) == 0


def test_following_the_waits_admits_the_configured_rate_and_no_more() -> None:
    """A client that asks again exactly when told gets size + burst at once, then
    exactly rate x time: the count is bounded above and below by the model."""
    clock = FakeClock()
    config = BucketConfig(size=50, refill_ms=100, one_time_burst=20)  # 500/s
    throttle = Throttle(limiter(clock, ops=config))
    admitted_at: list[int] = []
    while clock.now <= 2000 * MS:
        wait = throttle.admit(0)
        if wait:
            clock.now += wait
        else:
            admitted_at.append(clock.now)
    assert sum(1 for t in admitted_at if t == 0) == 70
    for horizon_ms in (1, 10, 333, 1000, 2000):
        count = sum(1 for t in admitted_at if t <= horizon_ms * MS)
        assert count == 70 + horizon_ms * 500 // 1000


def test_a_request_needs_both_buckets_and_a_refusal_takes_from_neither() -> None:
    clock = FakeClock()
    shared = limiter(clock, ops=BucketConfig(size=10, refill_ms=1000),
                     bandwidth=BucketConfig(size=4096, refill_ms=1000))
    throttle = Throttle(shared)
    assert throttle.admit(4096) == 0
    assert shared.levels() == {"bandwidth": 0, "ops": 9}
    wait = throttle.admit(512)
    assert wait == 125 * MS  # 512 bytes at 4096 per second
    assert shared.levels() == {"bandwidth": 0, "ops": 9}  # the op was not taken
    # Bytes-free requests (a flush) only need an op.
    assert throttle.admit(0) == 0
    assert shared.levels() == {"bandwidth": 0, "ops": 8}


def test_the_throttle_records_the_wait_under_the_bucket_that_refused() -> None:
    clock = FakeClock()
    throttle = Throttle(limiter(clock, ops=BucketConfig(size=1, refill_ms=100),
                                bandwidth=BucketConfig(size=10_000, refill_ms=1000)))
    assert throttle.admit(100) == 0
    assert throttle.admit(100) == 100 * MS
    clock.at_ms(40)
    assert throttle.admit(100) == 60 * MS  # the same request, asked again
    assert throttle.wait_seconds()["ops"] == pytest.approx(0.040)
    clock.at_ms(100)
    assert throttle.admit(100) == 0
    assert throttle.wait_ns == {"bandwidth": 0, "ops": 100 * MS}
    assert (throttle.throttled, throttle.admitted_ops, throttle.admitted_bytes) == (1, 2, 200)


def test_group_members_share_the_buckets() -> None:
    clock = FakeClock()
    group = limiter(clock, ops=BucketConfig(size=4, refill_ms=1000))
    first, second = Throttle(group), Throttle(group)
    assert [first.admit(0), second.admit(0), first.admit(0), second.admit(0)] == [0] * 4
    assert first.admit(0) == second.admit(0) == 250 * MS


def test_ready_and_charge_let_a_cost_known_afterwards_run_into_debt() -> None:
    clock = FakeClock()
    shared = limiter(clock, bandwidth=BucketConfig(size=1000, refill_ms=1000))
    throttle = Throttle(shared)
    assert throttle.ready() == 0
    throttle.charge(1500)
    assert shared.levels() == {"bandwidth": -500}
    assert throttle.ready() == 501 * MS  # until one byte is back
    clock.at_ms(501)
    assert throttle.ready() == 0
    throttle.charge(10)
    assert throttle.wait_ns["bandwidth"] == 501 * MS


def test_reconfigure_keeps_the_level_capped_at_the_new_size() -> None:
    clock = FakeClock()
    shared = limiter(clock, ops=BucketConfig(size=100, refill_ms=1000))
    throttle = Throttle(shared)
    for _ in range(30):
        assert throttle.admit(0) == 0
    shared.reconfigure(RateLimitConfig(ops=BucketConfig(size=10, refill_ms=1000),
                                       bandwidth=BucketConfig(size=100, refill_ms=10)))
    assert shared.levels() == {"ops": 10, "bandwidth": 100}
    shared.reconfigure(RateLimitConfig())
    assert shared.levels() == {}
    assert throttle.admit(10**9) == 0


def test_bad_bucket_values_are_refused() -> None:
    for bad in ({"size": 0, "refill_ms": 1}, {"size": 1, "refill_ms": 0},
                {"size": 1, "refill_ms": 1, "one_time_burst": -1}):
        with pytest.raises(ValueError):
            BucketConfig(**bad)
