"""A daemon-wide rate-limit group in shared memory (``--isolation process``): the same
answers as the in-process model, across processes (each with its own description of the
group's memfd, as the daemon hands them out) and threads, a lock that a dead holder
releases and a busy one never turns into a hang, and garbage in the page clamped."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.ratelimit import (
    BUCKET_SIZE_MAX,
    REFILL_MS_MAX,
    BucketConfig,
    RateLimitConfig,
    RateLimiter,
    SharedLimiterError,
    SharedRateLimiter,
    Throttle,
)
from avmm.ratelimit import _shared as shared
from avmm.ratelimit._shared import LOCK_BUSY_WAIT_NS, STATE_SIZE
from tests.ratelimit.test_bucket import MS, SCRIPTS, FakeClock

BOTH = RateLimitConfig(ops=BucketConfig(size=10, refill_ms=1000),
                       bandwidth=BucketConfig(size=4096, refill_ms=1000, one_time_burst=1000))


@contextmanager
def group(config: RateLimitConfig, clock: Callable[[], int]) -> Iterator[SharedRateLimiter]:
    limiter = SharedRateLimiter.create(config, clock=clock, name="tenant")
    try:
        yield limiter
    finally:
        limiter.close()


@contextmanager
def worker_view(daemon: SharedRateLimiter, clock: Callable[[], int],
                **kwargs: Any) -> Iterator[SharedRateLimiter]:
    """What a worker maps: a description of its own, as the daemon hands it over."""
    limiter = SharedRateLimiter.attach(daemon.handout_fd(), clock=clock, name="tenant",
                                       **kwargs)
    try:
        yield limiter
    finally:
        limiter.close()


@pytest.mark.parametrize(("script", "size", "refill_ms", "burst"), SCRIPTS)
def test_a_scripted_sequence_is_admitted_as_the_model_says(
        script: list[tuple[float, int, bool]], size: int, refill_ms: int, burst: int) -> None:
    """tests/ratelimit/test_bucket.py's scripts, taken alternately by the daemon's and a
    worker's view of one group: the same answers, debt and one-time burst included."""
    clock = FakeClock()
    config = RateLimitConfig(bandwidth=BucketConfig(size=size, refill_ms=refill_ms,
                                                    one_time_burst=burst))
    with group(config, clock) as daemon, worker_view(daemon, clock) as worker:
        admitted = []
        for step, (at_ms, tokens, _) in enumerate(script):
            clock.at_ms(at_ms)
            wait, _kind = (daemon, worker)[step % 2].try_take(0, tokens, clock())
            admitted.append((at_ms, tokens, wait == 0))
    assert admitted == script


def _child(fd: int, commands: int, results: int) -> None:
    """A second process on its own description of the group: each command line (the
    fake time, what to do) answered with a result line."""
    status = 1
    try:
        now = [0]
        limiter = SharedRateLimiter.attach(fd, clock=lambda: now[0], name="tenant")
        with os.fdopen(commands) as reader, os.fdopen(results, "w") as writer:
            for line in reader:
                now[0], op, ops, nbytes = json.loads(line)
                if op == "try_take":
                    result: Any = list(limiter.try_take(ops, nbytes, now[0]))
                elif op == "take":
                    limiter.take(ops, nbytes, now[0])
                    result = None
                else:
                    result = limiter.levels()
                writer.write(json.dumps(result) + "\n")
                writer.flush()
        status = 0
    finally:
        os._exit(status)


@contextmanager
def other_process(daemon: SharedRateLimiter) -> Iterator[Callable[..., Any]]:
    """A forked process with the group (a description of its own), driven step by step:
    ``call(now, op, ops, nbytes)``."""
    fd = daemon.handout_fd()
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_child)
        os.close(from_child)
        _child(fd, from_parent, to_parent)
    os.close(fd)
    os.close(from_parent)
    os.close(to_parent)
    with os.fdopen(to_child, "w") as writer, os.fdopen(from_child) as reader:

        def call(now: int, op: str, ops: int = 0, nbytes: int = 0) -> Any:
            writer.write(json.dumps([now, op, ops, nbytes]) + "\n")
            writer.flush()
            line = reader.readline()
            assert line, "the other process died"
            result = json.loads(line)
            return tuple(result) if isinstance(result, list) else result

        try:
            yield call
        finally:
            writer.close()
            _, status = os.waitpid(pid, 0)
    assert status == 0


def test_two_processes_sharing_a_group_get_the_answers_of_one_in_process_limiter() -> None:
    """A random sequence of admissions and charges (a NIC's RX), split at random between
    the daemon, a worker in this process and a worker in another process, each with the
    fake time of its step: every answer and every level is the in-process model's."""
    rng = random.Random(14)
    clock = FakeClock()
    model = RateLimiter(BOTH, clock=clock)
    with group(BOTH, clock) as daemon, worker_view(daemon, clock) as here, \
            other_process(daemon) as there:
        for _ in range(400):
            clock.now += rng.choice([0, 0, 1, 37 * MS, rng.randrange(0, 400 * MS)])
            ops, nbytes = rng.choice([0, 1, 1, 2]), rng.choice([0, 1, 512, 4096, 9000])
            op = rng.choice(["try_take", "try_take", "try_take", "take"])
            where = rng.randrange(3)
            if op == "take":
                model.take(ops, nbytes, clock.now)
            expected = model.try_take(ops, nbytes, clock.now) if op == "try_take" else None
            if where == 2:
                got = there(clock.now, op, ops, nbytes)
            else:
                limiter = (daemon, here)[where]
                got = getattr(limiter, op)(ops, nbytes, clock.now)
            assert got == expected, (op, ops, nbytes)
            assert there(clock.now, "levels") == daemon.levels() == here.levels() \
                == model.levels()


def test_a_change_by_the_daemon_reaches_the_other_processes_at_their_next_request() -> None:
    clock = FakeClock()
    with group(RateLimitConfig(ops=BucketConfig(size=2, refill_ms=1000)), clock) as daemon, \
            other_process(daemon) as there:
        assert [there(0, "try_take", 1)[0] for _ in range(3)] == [0, 0, 500 * MS]
        # As the in-process limiter: the level carries over (capped), the burst anew.
        wider = RateLimitConfig(ops=BucketConfig(size=100, refill_ms=1000, one_time_burst=5))
        daemon.reconfigure(wider)
        assert daemon.config == wider
        assert there(0, "levels") == {"ops": 0}
        assert [there(0, "try_take", 1)[0] for _ in range(5)] == [0] * 5  # the burst
        assert there(0, "try_take", 1) == (10 * MS, "ops")
        # A bucket the group did not have starts full; one it no longer has is gone.
        daemon.reconfigure(RateLimitConfig(bandwidth=BucketConfig(size=1000, refill_ms=10)))
        assert there(0, "levels") == {"bandwidth": 1000}
        assert there(0, "try_take", 1, 1000) == (0, None)
        assert there(0, "try_take", 1, 1) == (10_000, "bandwidth")


def test_threads_and_processes_never_spend_a_token_twice() -> None:
    """Two threads here and another process take single tokens until the bucket is
    empty (no refill: the clock stands still): together they got exactly its size."""
    size = 600
    clock = FakeClock()
    with group(RateLimitConfig(ops=BucketConfig(size=size, refill_ms=REFILL_MS_MAX)),
               clock) as daemon, worker_view(daemon, clock) as here:
        counts: list[int] = []

        def drain(limiter: SharedRateLimiter) -> None:
            admitted = 0
            while (wait := limiter.try_take(1, 0, 0)[0]) in (0, LOCK_BUSY_WAIT_NS):
                admitted += wait == 0
            counts.append(admitted)

        with other_process(daemon) as there:
            threads = [threading.Thread(target=drain, args=(here,)) for _ in range(2)]
            for thread in threads:
                thread.start()
            admitted_there = 0
            while (wait := there(0, "try_take", 1)[0]) in (0, LOCK_BUSY_WAIT_NS):
                admitted_there += wait == 0
            for thread in threads:
                thread.join()
        assert sum(counts) + admitted_there == size, (counts, admitted_there)
        assert daemon.levels() == {"ops": 0}


def test_a_busy_lock_is_a_short_wait_and_a_holder_that_dies_releases_it() -> None:
    clock = FakeClock()
    with group(BOTH, clock) as daemon, worker_view(daemon, clock) as here:
        ready_read, ready_write = os.pipe()
        fd = daemon.handout_fd()
        pid = os.fork()
        if pid == 0:  # a worker that takes the lock and never lets it go
            holder = SharedRateLimiter.attach(fd, clock=clock)
            holder._lock.acquire(1.0)
            os.write(ready_write, b"x")
            time.sleep(60)
            os._exit(0)
        os.close(fd)
        try:
            assert os.read(ready_read, 1) == b"x"
            started = time.monotonic()
            # Refused for now (as if empty), not hung; a charge is owed, not lost.
            assert here.try_take(1, 100, 0) == (LOCK_BUSY_WAIT_NS, "bandwidth")
            assert here.check(1, 100, 0)[0] == LOCK_BUSY_WAIT_NS
            here.take(1, 500, 0)
            assert here.lock_busy == 3
            # Read without the lock (the page as it is), and shown by the daemon.
            assert daemon.levels() == {"bandwidth": 4096, "ops": 10}
            assert here.config == BOTH
            assert time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(ready_read)
            os.close(ready_write)
        # Its lock went with it: the owed charge is taken first (500 of the burst's
        # 1000, then this request's 100).
        assert here.try_take(1, 100, 0) == (0, None)
        assert daemon.levels() == {"bandwidth": 4096, "ops": 8}
        assert here.try_take(0, 400, 0) == (0, None)
        assert here.try_take(0, 4096, 0) == (0, None)
        assert daemon.levels() == {"bandwidth": 0, "ops": 8}


def test_a_worker_takes_only_a_sealed_memfd_of_the_state_s_size() -> None:
    fd = os.memfd_create("not-a-group", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, STATE_SIZE)
    with pytest.raises(SharedLimiterError, match="sealed"):
        SharedRateLimiter.attach(fd)  # not sealed: a peer could cut it short (SIGBUS)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by attach
    with group(BOTH, FakeClock()) as daemon, pytest.raises(OSError):
        os.ftruncate(daemon._fd, 0)  # the daemon's own is sealed


#: Byte offsets in the page of the ops bucket (the second slot): its configuration,
#: level, burst left and last refill.
_OPS = 16 + 64


def _put(page: Any, offset: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, page, offset, *values)


@settings(max_examples=150, deadline=None)
@given(garbage=st.binary(min_size=16 + 2 * 64, max_size=16 + 2 * 64),
       now=st.integers(min_value=0, max_value=1 << 62))
def test_garbage_in_the_page_never_crashes_or_hangs_and_is_clamped(garbage: bytes,
                                                                     now: int) -> None:
    """Whatever a hostile worker writes into a group's page, the other processes (the
    daemon included) answer, with values the model can reach."""
    clock = FakeClock()
    clock.now = now
    with group(BOTH, clock) as daemon, worker_view(daemon, clock) as worker:
        worker._map[:len(garbage)] = garbage
        for limiter in (worker, daemon):
            wait, kind = limiter.try_take(1, 512, now)
            assert isinstance(wait, int) and wait >= 0 and kind in (None, "ops", "bandwidth")
            assert limiter.check(1, 1, now)[0] >= 0
            limiter.take(1, 100, now)
            config = worker.config
            for bucket in (config.bandwidth, config.ops):
                if bucket is not None:
                    assert 1 <= bucket.size <= BUCKET_SIZE_MAX
                    assert 1 <= bucket.refill_ms <= REFILL_MS_MAX
                    assert 0 <= bucket.one_time_burst <= BUCKET_SIZE_MAX
            for kind_name, level in limiter.levels().items():
                bucket = getattr(config, kind_name)
                assert level <= bucket.size
            json.dumps(daemon.levels())  # the API can show it
        assert daemon.config == BOTH  # the daemon's own copy
        # The daemon's next change makes it a group again for everyone.
        daemon.reconfigure(BOTH)
        assert worker.config == BOTH


def test_values_out_of_the_model_s_range_are_clamped_to_it() -> None:
    clock = FakeClock()
    clock.at_ms(1000)
    config = RateLimitConfig(ops=BucketConfig(size=10, refill_ms=1000, one_time_burst=3))
    with group(config, clock) as daemon, worker_view(daemon, clock) as worker:
        page = worker._map
        # A level above full, a burst above the configured one: a full bucket, the
        # configured burst (and no more).
        page[_OPS + 32:_OPS + 48] = (1 << 100).to_bytes(16, "little", signed=True)
        _put(page, _OPS + 48, "<Qq", (1 << 64) - 1, clock.now)
        throttle = Throttle(worker)
        assert [throttle.admit(0) for _ in range(13)] == [0] * 13
        assert throttle.admit(0) == 100 * MS
        # A last refill far in the future is taken as now: the bucket refills from
        # there, it does not stall until then.
        _put(page, _OPS + 48, "<Qq", 0, (1 << 63) - 1)
        assert worker.try_take(1, 0, clock.now)[0] == 100 * MS
        clock.now += 100 * MS
        assert worker.try_take(1, 0, clock.now) == (0, None)
        # A configuration out of range: clamped to what a config may name.
        _put(page, _OPS, "<QQQQ", 1, 0, (1 << 64) - 1, (1 << 64) - 1)
        seen = worker.config.ops
        assert seen == BucketConfig(size=1, refill_ms=REFILL_MS_MAX,
                                    one_time_burst=BUCKET_SIZE_MAX)
        # A debt beyond any request's: clamped, still a finite wait.
        _put(page, _OPS, "<QQQQ", 1, 10, 1000, 0)
        page[_OPS + 32:_OPS + 48] = (-(1 << 126)).to_bytes(16, "little", signed=True)
        wait, kind = worker.try_take(1, 0, clock.now)
        assert kind == "ops" and 0 < wait <= ((1 << 48) + 1) * 100 * MS
        assert worker.levels()["ops"] >= -(1 << 48)


def test_the_daemon_closing_a_group_never_waits_for_a_change_in_progress() -> None:
    """DELETE on the event loop while a PUT's thread waits for a worker's lock: the
    close returns at once, and the thread closes the group when it is done."""
    clock = FakeClock()
    daemon = SharedRateLimiter.create(BOTH, clock=clock, name="tenant")
    ready_read, ready_write = os.pipe()
    fd = daemon.handout_fd()
    pid = os.fork()
    if pid == 0:  # a worker that holds the group's lock
        holder = SharedRateLimiter.attach(fd, clock=clock)
        holder._lock.acquire(1.0)
        os.write(ready_write, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(fd)
    try:
        assert os.read(ready_read, 1) == b"x"
        changed = RateLimitConfig(ops=BucketConfig(size=1, refill_ms=1))
        change = threading.Thread(target=daemon.reconfigure, args=(changed,))
        change.start()
        time.sleep(0.1)  # the change waits for the lock (up to 1 s)
        started = time.monotonic()
        daemon.close()
        assert time.monotonic() - started < 0.5  # the change waits up to 1 s
        change.join()
        assert daemon._closed
        assert daemon.levels() == {}
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
        os.close(ready_write)


@contextmanager
def lock_held_elsewhere(daemon: SharedRateLimiter) -> Iterator[None]:
    """The group's OFD lock held by another open file description (another process's,
    as far as the lock can tell), which never lets it go."""
    fd = daemon.handout_fd()
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        yield
    finally:
        os.close(fd)


def test_an_admission_never_waits_for_a_lock_another_process_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile worker holding its group's lock: a co-group worker's admission (on its
    event loop, for a NIC) returns at once, asked to retry, never sleeping for it."""
    clock = FakeClock()
    with group(BOTH, clock) as daemon, worker_view(daemon, clock) as here, \
            lock_held_elsewhere(daemon):

        def no_sleep(seconds: float) -> None:
            raise AssertionError(f"an admission slept {seconds} s for the lock")

        monkeypatch.setattr(time, "sleep", no_sleep)
        assert here.try_take(1, 100, 0) == (LOCK_BUSY_WAIT_NS, "bandwidth")
        assert here.check(1, 100, 0)[0] == LOCK_BUSY_WAIT_NS
        here.take(1, 100, 0)
        assert here.lock_busy == 3
        assert here.config == BOTH  # a worker's read of the page does not wait either


def test_a_put_cuts_a_debt_a_worker_wrote_to_one_bucket() -> None:
    """A hostile worker writes the deepest debt the page keeps (2^48 tokens: days of
    refill); the daemon's PUT gives the group service back within a refill period."""
    clock = FakeClock()
    clock.at_ms(1000)
    config = RateLimitConfig(ops=BucketConfig(size=10, refill_ms=1000))
    with group(config, clock) as daemon, worker_view(daemon, clock) as worker:
        worker._map[_OPS + 32:_OPS + 48] = \
            (-(1 << 48) * 1000 * MS).to_bytes(16, "little", signed=True)
        assert daemon.levels() == {"ops": -(1 << 48)}
        daemon.reconfigure(config)
        assert daemon.levels() == {"ops": -10}
        assert worker.try_take(1, 0, clock.now) == (1100 * MS, "ops")
        clock.now += 1100 * MS
        assert worker.try_take(1, 0, clock.now) == (0, None)
        # A debt within one bucket is kept, as the in-process limiter keeps it.
        worker.take(15, 0, clock.now)
        daemon.reconfigure(RateLimitConfig(ops=BucketConfig(size=20, refill_ms=1000)))
        assert daemon.levels() == {"ops": -15}


class _OwnedLock:
    """A threading.Lock that knows which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None
        self.taken = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
            self.taken.set()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def test_two_puts_of_one_group_change_it_one_after_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two PUTs of one group while a worker holds its lock: the second waits for the
    first (however long that waits for the worker), never rewrites the page beside it;
    the group ends as the second says, for the daemon and for the workers."""
    monkeypatch.setattr(shared, "RECONFIGURE_LOCK_WAIT_S", 0.2)
    clock = FakeClock()
    first = RateLimitConfig(ops=BucketConfig(size=5, refill_ms=1000))
    second = RateLimitConfig(bandwidth=BucketConfig(size=7, refill_ms=1000))
    with group(BOTH, clock) as daemon, worker_view(daemon, clock) as worker:
        threads_lock = _OwnedLock()
        daemon._lock._threads = threads_lock  # type: ignore[assignment]
        unlocked: list[int] = []
        load = daemon._load

        def checked_load(now_ns: int, into: Any = None) -> None:
            if into is None and threads_lock.owner != threading.get_ident():
                unlocked.append(threading.get_ident())
            load(now_ns, into)
            if threading.current_thread() is put_first:
                time.sleep(0.6)  # a slow change: the second outwaits its lock wait


        monkeypatch.setattr(daemon, "_load", checked_load)
        with lock_held_elsewhere(daemon):
            put_first = threading.Thread(target=daemon.reconfigure, args=(first,))
            put_first.start()
            assert threads_lock.taken.wait(5)
            put_second = threading.Thread(target=daemon.reconfigure, args=(second,))
            put_second.start()
            put_first.join()
            put_second.join()
        assert unlocked == []
        assert daemon.config == second == worker.config
        assert daemon.levels() == {"bandwidth": 7} == worker.levels()
