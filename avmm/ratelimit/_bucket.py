"""Token buckets and the limiters made of them (Firecracker's model, written anew).

A :class:`TokenBucket` holds up to ``size`` tokens and refills at ``size`` tokens per
``refill_ms``, continuously. It starts full; ``one_time_burst`` tokens come on top,
are spent first and never come back, and the refill starts once they are spent (the
bucket is full until then anyway). A request for ``n`` tokens is admitted when the
bucket holds ``n``; a request larger than the whole bucket (``n > size``) is admitted
when the bucket is full and drives it into debt (a negative level), so that the
requests after it wait until the debt is refilled: every request costs exactly its
tokens, however large, and the long-run rate is the configured one.

A :class:`RateLimiter` has up to two buckets, ``bandwidth`` (bytes) and ``ops``
(requests); a request is admitted when both admit it, and then takes from both. It is
thread-safe (one lock), so that the devices of a rate-limit group (blk I/O threads, the
event loop for net) can share one. A :class:`Throttle` is one device's (or one
direction's) handle on a limiter: it counts what it admitted and how long its requests
waited, per bucket.

Nothing here sleeps: a refused request gets the nanoseconds after which it would be
admitted, and the caller waits on its own timer (``poll`` with a timeout on an I/O
thread, ``trio.sleep`` on the event loop). The clock is injected (``clock`` returns
integer nanoseconds, :func:`time.monotonic_ns` by default), and every quantity is an
integer: tokens are kept scaled by ``refill_ns``, so that ``elapsed_ns * size`` is
exactly the refill, with no rounding drift, and a test with a fake clock can predict
every decision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "BUCKET_KINDS",
    "BUCKET_SIZE_MAX",
    "LIMITER_WAIT_SLICE_S",
    "REFILL_MS_MAX",
    "BucketConfig",
    "BucketKind",
    "Clock",
    "RateLimitConfig",
    "RateLimiter",
    "Throttle",
    "TokenBucket",
    "limiter_wait_s",
]

Clock = Callable[[], int]
BucketKind = Literal["bandwidth", "ops"]
BUCKET_KINDS: Final[tuple[BucketKind, ...]] = ("bandwidth", "ops")
_NS_PER_MS: Final = 1_000_000
#: The largest bucket (bytes or requests) and the longest refill a limit may name.
BUCKET_SIZE_MAX: Final = 1 << 40
REFILL_MS_MAX: Final = 3_600_000
#: The deepest debt a bucket loaded from shared memory keeps, in tokens (far more than
#: any request costs: a disk request is at most 4 GiB); below, it is clamped. A worker
#: can still write that much into a group's page, days of refill: so the daemon's change
#: of a shared group (``PUT``) cuts a debt it carries over to one bucket, ``-size``
#: (:func:`replace_bucket`'s ``debt_max``), and service comes back within about one
#: refill period.
DEBT_MAX: Final = 1 << 48
#: How far in the future a loaded bucket's last refill may lie (another process read the
#: clock a little later and stored first); further is garbage, and taken as now.
CLOCK_SKEW_NS: Final = 1_000_000_000
#: The longest single timed wait of a device for its limiter: a limit changed at run
#: time (PATCH) takes effect within it, whatever the wait the old limit asked for.
LIMITER_WAIT_SLICE_S: Final = 0.1


def limiter_wait_s(wait_ns: int) -> float:
    """How long a device waits now for a limiter that asked for ``wait_ns``."""
    return min(wait_ns / 1e9, LIMITER_WAIT_SLICE_S)


@dataclass(frozen=True, slots=True)
class BucketConfig:
    """One bucket: ``size`` tokens (bytes or requests), refilled in ``refill_ms``
    milliseconds from empty to full; ``one_time_burst`` extra tokens at the start."""

    size: int
    refill_ms: int
    one_time_burst: int = 0

    def __post_init__(self) -> None:
        # The config loader gives the user a message naming the key; this guards the
        # objects made by hand (tests, the back-end's flags).
        if self.size < 1 or self.refill_ms < 1 or self.one_time_burst < 0:
            raise ValueError(f"bad token bucket {self}: size and refill_ms must be at "
                             "least 1, one_time_burst at least 0")

    @property
    def per_second(self) -> float:
        """The sustained rate: tokens per second."""
        return self.size * 1000 / self.refill_ms

    def to_dict(self) -> dict[str, int]:
        result = {"size": self.size, "refill_ms": self.refill_ms}
        if self.one_time_burst:
            result["one_time_burst"] = self.one_time_burst
        return result


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A limiter's buckets; a missing one does not limit."""

    bandwidth: BucketConfig | None = None
    ops: BucketConfig | None = None

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def to_dict(self) -> dict[str, Any]:
        return {kind: bucket.to_dict() for kind in BUCKET_KINDS
                if (bucket := getattr(self, kind)) is not None}


class TokenBucket:
    """One bucket's state (see the module docstring). Not thread-safe: the
    :class:`RateLimiter` that owns it serialises the calls."""

    __slots__ = ("_full", "_last_ns", "_level", "_refill_ns", "burst", "config", "size")

    def __init__(self, config: BucketConfig, now_ns: int, *,
                 level: int | None = None) -> None:
        self.config = config
        self.size = config.size
        self._refill_ns = config.refill_ms * _NS_PER_MS
        # Tokens times refill_ns: refilling for e ns adds exactly e * size.
        self._full = self.size * self._refill_ns
        self._level = self._full if level is None else min(level, self.size) * self._refill_ns
        self.burst = config.one_time_burst
        self._last_ns = now_ns

    @property
    def tokens(self) -> float:
        """The level at the last update, in tokens (negative: debt)."""
        return self._level / self._refill_ns

    def level_at(self, now_ns: int) -> int:
        """The whole tokens held at ``now_ns`` (negative: debt), burst not included."""
        self._refill(now_ns)
        return self._level // self._refill_ns

    def _refill(self, now_ns: int) -> None:
        elapsed = now_ns - self._last_ns
        if elapsed <= 0:
            return
        self._last_ns = now_ns
        if self.burst:
            return  # the refill starts once the burst is spent (the bucket is full)
        level = self._level + elapsed * self.size
        self._level = level if level < self._full else self._full

    def wait_ns(self, tokens: int, now_ns: int) -> int:
        """0 if ``tokens`` would be admitted at ``now_ns``, else the nanoseconds until
        they would be (if nothing else takes from the bucket meanwhile)."""
        self._refill(now_ns)
        tokens -= min(self.burst, tokens)
        if tokens <= 0:
            return 0
        # A request larger than the bucket waits for a full bucket, then goes into debt.
        missing = min(tokens, self.size) * self._refill_ns - self._level
        if missing <= 0:
            return 0
        return -(-missing // self.size)  # rounded up: at that time it is admitted

    def take(self, tokens: int, now_ns: int) -> None:
        """Take ``tokens``, whatever the level (the caller checked, or charges a cost
        known only afterwards): the burst first, then the bucket, into debt if need be."""
        self._refill(now_ns)
        from_burst = min(self.burst, tokens)
        self.burst -= from_burst
        self._level -= (tokens - from_burst) * self._refill_ns

    def state(self) -> tuple[int, int, int]:
        """(the level times refill_ns, the burst left, the last refill's time): what
        :meth:`load` takes back (a bucket kept in memory shared across processes)."""
        return self._level, self.burst, self._last_ns

    def load(self, level: int, burst: int, last_ns: int, now_ns: int) -> None:
        """Take the state :meth:`state` gave, from memory another process may have
        written: every value is clamped into what the model can reach (a level of at
        most a full bucket and at least :data:`DEBT_MAX` tokens of debt, a burst of at
        most the configured one, a last refill no later than ``now_ns`` plus
        :data:`CLOCK_SKEW_NS`), so that garbage gives a bucket that works, never an
        error or an endless wait."""
        floor = -DEBT_MAX * self._refill_ns
        self._level = self._full if level > self._full else floor if level < floor else level
        self.burst = min(max(burst, 0), self.config.one_time_burst)
        self._last_ns = now_ns if last_ns > now_ns + CLOCK_SKEW_NS else last_ns


class RateLimiter:
    """Up to two buckets, ``bandwidth`` (bytes) and ``ops`` (requests), behind one lock;
    shared by every :class:`Throttle` of a rate-limit group.

    ``clock()`` returns monotonic nanoseconds (injected by tests).
    """

    def __init__(self, config: RateLimitConfig, *, clock: Clock = time.monotonic_ns,
                 name: str | None = None) -> None:
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self.config = config
        now = clock()
        self._bandwidth = None if config.bandwidth is None \
            else TokenBucket(config.bandwidth, now)
        self._ops = None if config.ops is None else TokenBucket(config.ops, now)

    def reconfigure(self, config: RateLimitConfig) -> None:
        """Change the buckets in place (every throttle on this limiter sees it at its
        next request). A bucket that stays keeps its level, debt included, capped at the
        new size; a new bucket starts full; a ``one_time_burst`` is granted anew."""
        with self._lock:
            now = self.clock()
            self._bandwidth = _replace(self._bandwidth, config.bandwidth, now)
            self._ops = _replace(self._ops, config.ops, now)
            self.config = config

    def check(self, ops: int, nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
        """(0, None) if the request would be admitted now, else (ns to wait, the bucket
        that needs the longer wait). Takes nothing."""
        with self._lock:
            return self._check(ops, nbytes, now_ns)

    def _check(self, ops: int, nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
        return check_buckets(self._bandwidth, self._ops, ops, nbytes, now_ns)

    def try_take(self, ops: int, nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
        """Admit the request and take its tokens from both buckets, or take nothing and
        return (ns to wait, the bucket that refused) as :meth:`check` does."""
        with self._lock:
            wait, kind = self._check(ops, nbytes, now_ns)
            if not wait:
                self._take(ops, nbytes, now_ns)
            return wait, kind

    def take(self, ops: int, nbytes: int, now_ns: int) -> None:
        """Take the tokens whatever the levels (a cost known only after the fact)."""
        with self._lock:
            self._take(ops, nbytes, now_ns)

    def _take(self, ops: int, nbytes: int, now_ns: int) -> None:
        take_buckets(self._bandwidth, self._ops, ops, nbytes, now_ns)

    def levels(self) -> dict[str, int]:
        """Whole tokens in each bucket now (negative: debt), for GET /vms/{id}."""
        with self._lock:
            now = self.clock()
            return {kind: bucket.level_at(now) for kind, bucket in
                    (("bandwidth", self._bandwidth), ("ops", self._ops))
                    if bucket is not None}


def check_buckets(bandwidth: TokenBucket | None, ops_bucket: TokenBucket | None, ops: int,
                  nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
    """A limiter's admission decision over its two buckets (see
    :meth:`RateLimiter.check`): one model for the in-process limiter and the one whose
    buckets live in shared memory (avmm.ratelimit._shared)."""
    wait = 0
    kind: BucketKind | None = None
    if bandwidth is not None and nbytes:
        wait = bandwidth.wait_ns(nbytes, now_ns)
        if wait:
            kind = "bandwidth"
    if ops_bucket is not None and ops:
        ops_wait = ops_bucket.wait_ns(ops, now_ns)
        if ops_wait > wait:
            wait, kind = ops_wait, "ops"
    return wait, kind


def take_buckets(bandwidth: TokenBucket | None, ops_bucket: TokenBucket | None, ops: int,
                 nbytes: int, now_ns: int) -> None:
    """Take a request's tokens from both buckets (see :meth:`RateLimiter.take`)."""
    if bandwidth is not None and nbytes:
        bandwidth.take(nbytes, now_ns)
    if ops_bucket is not None and ops:
        ops_bucket.take(ops, now_ns)


def replace_bucket(bucket: TokenBucket | None, config: BucketConfig | None,
                   now_ns: int, *, debt_max: int | None = None) -> TokenBucket | None:
    """The bucket after a reconfiguration (see :meth:`RateLimiter.reconfigure`);
    ``debt_max``: the most tokens of debt it carries over (None: all of it)."""
    if config is not None and bucket is not None and debt_max is not None:
        return TokenBucket(config, now_ns, level=max(bucket.level_at(now_ns), -debt_max))
    return _replace(bucket, config, now_ns)


def _replace(bucket: TokenBucket | None, config: BucketConfig | None,
             now_ns: int) -> TokenBucket | None:
    if config is None:
        return None
    if bucket is None:
        return TokenBucket(config, now_ns)
    return TokenBucket(config, now_ns, level=bucket.level_at(now_ns))


class Throttle:
    """One device's (or one NIC direction's) handle on a :class:`RateLimiter`.

    Used by the one thread that serves the device; its counters are plain ints that
    other threads may read. Every request counts one op. A request that is refused is
    retried by the caller after the wait it was told; the time from its first refusal
    to its admission is added to :attr:`wait_ns` under the bucket that refused it first.
    """

    __slots__ = ("_blocked_kind", "_blocked_since", "admitted_bytes", "admitted_ops",
                 "limiter", "throttled", "wait_ns")

    def __init__(self, limiter: RateLimiter) -> None:
        #: Replaced whole when the device changes limiter (one attribute store, which
        #: the serving thread sees at its next request).
        self.limiter = limiter
        self.admitted_ops = 0
        self.admitted_bytes = 0
        #: Requests that had to wait at least once.
        self.throttled = 0
        self.wait_ns: dict[BucketKind, int] = dict.fromkeys(BUCKET_KINDS, 0)
        self._blocked_since: int | None = None
        self._blocked_kind: BucketKind = "ops"

    def admit(self, nbytes: int) -> int:
        """One request of ``nbytes`` bytes: 0 if admitted (its tokens are taken), else
        the nanoseconds to wait before asking again."""
        now = self.limiter.clock()
        wait, kind = self.limiter.try_take(1, nbytes, now)
        if wait:
            self._refused(now, kind)
            return wait
        self._admitted(now, nbytes)
        return 0

    def ready(self) -> int:
        """0 if a request could start now (one op, and at least one byte of bandwidth:
        not in debt), else the nanoseconds to wait. Takes nothing: for a request whose
        size is known only once it is done (a received frame), followed by
        :meth:`charge`."""
        now = self.limiter.clock()
        wait, kind = self.limiter.check(1, 1, now)
        if wait:
            self._refused(now, kind)
        else:
            self._unblocked(now)  # the wait ends here, whether or not a request follows
        return wait

    def charge(self, nbytes: int) -> None:
        """Count one request of ``nbytes`` bytes that :meth:`ready` let start; its
        tokens are taken whatever the levels (the bandwidth may go into debt)."""
        now = self.limiter.clock()
        self.limiter.take(1, nbytes, now)
        self._admitted(now, nbytes)

    def _refused(self, now: int, kind: BucketKind | None) -> None:
        if self._blocked_since is None:
            self._blocked_since = now
            self._blocked_kind = kind or "ops"
            self.throttled += 1

    def _admitted(self, now: int, nbytes: int) -> None:
        self.admitted_ops += 1
        self.admitted_bytes += nbytes
        self._unblocked(now)

    def _unblocked(self, now: int) -> None:
        # One read of _blocked_since: unblock() may clear it from another thread.
        since = self._blocked_since
        if since is not None:
            self._blocked_since = None
            self.wait_ns[self._blocked_kind] += max(now - since, 0)

    def unblock(self) -> None:
        """The request that waited is no longer asked for (the device lost its limit):
        count its wait up to now and stop the clock on it."""
        self._unblocked(self.limiter.clock())

    def wait_seconds(self) -> dict[BucketKind, float]:
        """Seconds requests spent waiting, per bucket, the wait in progress included."""
        totals = dict(self.wait_ns)
        since = self._blocked_since
        if since is not None:
            totals[self._blocked_kind] += max(self.limiter.clock() - since, 0)
        return {kind: ns / 1e9 for kind, ns in totals.items()}

    def stats(self) -> dict[str, Any]:
        return {
            "admitted_ops": self.admitted_ops,
            "admitted_bytes": self.admitted_bytes,
            "throttled": self.throttled,
            "wait_seconds": self.wait_seconds(),
        }
