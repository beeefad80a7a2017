"""A rate limiter whose buckets live in memory shared by several processes: a daemon-wide
rate-limit group of ``avmm serve --isolation process``, used by VMs in different worker
processes.

The daemon makes one memfd per group (:meth:`SharedRateLimiter.create`), sealed against
shrinking and growing (a process that shares it cannot make the others fault on a mapping
cut short), and hands each worker whose VM names the group a descriptor of it
(:meth:`SharedRateLimiter.handout_fd`, over the worker's channel); the worker maps it
(:meth:`SharedRateLimiter.attach`). Both map the same page, which holds, per bucket
(``bandwidth``, ``ops``), the configuration (size, refill time, one-time burst) and what
:class:`~avmm.ratelimit.TokenBucket` keeps (the level, the burst left, the time of the
last refill). Every admission loads the buckets from the page, decides with the very
arithmetic of the in-process limiter (:func:`~._bucket.check_buckets`,
:func:`~._bucket.take_buckets`: same answers for the same requests and times, debt and
one-time burst included) and stores them back, all under a lock held across processes
and threads. The clock is ``CLOCK_MONOTONIC`` (:func:`time.monotonic_ns`), one clock for
every process of the host (the jail makes no time namespace).

The lock: an open-file-description lock (``fcntl(F_OFD_SETLK)``) on the memfd, which
conflicts between descriptions, so each process has a description of its own (the daemon
opens one per worker through ``/proc/self/fd``), plus a :class:`threading.Lock` for the
threads of one process, which share theirs. The OFD lock is only ever tried without
blocking. An admission (on a worker's event loop for a NIC, on an I/O thread for a disk)
tries it once and never sleeps: another process may hold it on purpose (a worker a guest
took over), and a wait there would stall the admitting VM's event loop. A request that
did not get it is told to wait :data:`LOCK_BUSY_WAIT_NS` and ask again, as if its bucket
were empty. (The thread lock is waited for, up to ``lock_wait_s``,
:data:`ADMIT_LOCK_WAIT_S`: only this process's own threads hold it, for a few
microseconds.) The daemon's reads (the levels ``GET /rate_limit_groups`` shows) try both
once and read the page as it is without them; its changes (``PUT``, in a thread) take
the thread lock whatever the wait (one change of a group at a time), then try the OFD
lock, again after short sleeps, for up to :data:`RECONFIGURE_LOCK_WAIT_S`, and rewrite
the page without it past that. A process that dies holding the lock releases it (the
kernel drops an OFD lock with the last descriptor of its description).

Trust. A worker runs the guest's device models; a worker that a guest took over can
write anything into the pages of the groups its VM names (and hold their locks), and so
starve or free the VMs that share a group with it: they chose to share one budget, and
that worker could also ignore its own limits. It reaches no other group (it is handed only
those its VM names) and nothing of the daemon's: every value loaded is clamped into what
the model can reach (:meth:`~avmm.ratelimit.TokenBucket.load`, and the configuration into
the limits a config may name), so garbage gives buckets that work, never an exception or
an endless wait, in a worker or in the daemon (which reads the levels for ``GET
/rate_limit_groups``); the daemon keeps its own copy of each group's configuration, which
is what it shows, and rewrites the page's on ``PUT``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import structlog

from ..errors import AvmmError
from ._bucket import (
    BUCKET_KINDS,
    BUCKET_SIZE_MAX,
    REFILL_MS_MAX,
    BucketConfig,
    BucketKind,
    Clock,
    RateLimitConfig,
    TokenBucket,
    check_buckets,
    replace_bucket,
    take_buckets,
)

__all__ = ["ADMIT_LOCK_WAIT_S", "LOCK_BUSY_WAIT_NS", "RECONFIGURE_LOCK_WAIT_S",
           "STATE_SIZE", "SharedLimiterError", "SharedRateLimiter"]

log = structlog.get_logger(__name__)

#: The shared state's size: one page.
STATE_SIZE: Final = 4096
#: How long an admission waits for the other threads of its process (the OFD lock,
#: which another process may hold, is tried once); past it the request waits
#: :data:`LOCK_BUSY_WAIT_NS`.
ADMIT_LOCK_WAIT_S: Final = 0.002
#: What a request that did not get the lock is told to wait before asking again.
LOCK_BUSY_WAIT_NS: Final = 1_000_000
#: How long the daemon's change of a group (``PUT``, from a thread) tries for the OFD
#: lock; past it the page is rewritten without it (a worker that holds it that long is
#: stuck or hostile; its readers clamp whatever they find).
RECONFIGURE_LOCK_WAIT_S: Final = 1.0

_MAGIC: Final = b"AVMMRLG1"
_HEADER: Final = struct.Struct("<8s8x")
#: Per bucket: present, size, refill_ms, one_time_burst; the level (times refill_ns, a
#: signed 128-bit integer: a full bucket of 2^40 tokens refilled in an hour is 2^82),
#: the burst left, the last refill (ns).
_CONFIG: Final = struct.Struct("<QQQQ")
_TAIL: Final = struct.Struct("<Qq")
_SLOT_SIZE: Final = 64
_LEVEL_OFFSET: Final = 32
_TAIL_OFFSET: Final = 48
_LEVEL_BYTES: Final = 16
_LEVEL_MAX: Final = (1 << 127) - 1
_LAST_MAX: Final = (1 << 63) - 1
#: struct flock (x86-64/aarch64 layout): l_type, l_whence, l_start, l_len, l_pid (0 for
#: OFD locks), padded to 32 bytes. The whole file is locked.
_FLOCK: Final = struct.Struct("hhqqi4x")
_WRITE_LOCK: Final = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK: Final = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedLimiterError(AvmmError):
    """A rate-limit group's shared memory could not be made, mapped or locked."""


def _slot(index: int) -> int:
    return _HEADER.size + index * _SLOT_SIZE


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


#: What :meth:`_ProcessLock.acquire` got.
_NOTHING: Final = 0
_THREADS_ONLY: Final = 1
_BOTH: Final = 2


class _ProcessLock:
    """The OFD lock on one description, and a thread lock for the threads sharing it."""

    __slots__ = ("_fd", "_threads")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._threads = threading.Lock()

    def acquire(self, threads_wait_s: float | None, ofd_wait_s: float = 0.0, *,
                keep_threads: bool = False) -> int:
        """:data:`_BOTH` once both are held; else :data:`_NOTHING` (nothing held), or
        with ``keep_threads`` :data:`_THREADS_ONLY` if the thread lock came and the OFD
        lock did not. The thread lock is waited for up to ``threads_wait_s`` (None: as
        long as it takes); the OFD lock is tried once, and again after short sleeps only
        while ``ofd_wait_s`` lasts (0: never sleeps; see the module docstring)."""
        if threads_wait_s is None:
            self._threads.acquire()
        elif not self._threads.acquire(timeout=max(threads_wait_s, 0.0)):
            return _NOTHING
        deadline = time.monotonic() + ofd_wait_s
        delay = 20e-6
        while True:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _WRITE_LOCK)
                return _BOTH
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EINTR):
                    self._threads.release()
                    raise SharedLimiterError(f"cannot lock a rate-limit group's shared "
                                             f"state: {e.strerror}") from None
            remaining = deadline - time.monotonic() if ofd_wait_s > 0 else 0.0
            if remaining <= 0:
                if keep_threads:
                    return _THREADS_ONLY
                self._threads.release()
                return _NOTHING
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.0005)

    def release(self, held: int) -> None:
        if held == _NOTHING:
            return
        try:
            if held == _BOTH:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _UNLOCK)
        except OSError:
            pass  # closing the description drops the lock anyway
        finally:
            self._threads.release()

    @property
    def threads(self) -> threading.Lock:
        return self._threads


class SharedRateLimiter:
    """:class:`~avmm.ratelimit.RateLimiter`'s interface (``clock``, ``name``,
    ``config``, ``check``, ``try_take``, ``take``, ``levels``; ``reconfigure`` in the
    daemon) over buckets in a shared page (see the module docstring). Thread-safe.

    Made by :meth:`create` (the daemon: it owns the configuration) or :meth:`attach` (a
    worker, from a descriptor :meth:`handout_fd` gave).
    """

    def __init__(self, fd: int, mapping: Any, *, owner_config: RateLimitConfig | None,
                 clock: Clock = time.monotonic_ns, name: str | None = None,
                 lock_wait_s: float = ADMIT_LOCK_WAIT_S) -> None:
        self.clock = clock
        self.name = name
        self._fd = fd
        self._map = mapping
        self._lock = _ProcessLock(fd)
        self._lock_wait_s = lock_wait_s
        #: The daemon's copy of the configuration (None in a worker: read from the page).
        self._owner_config = owner_config
        self._buckets: dict[BucketKind, TokenBucket | None] = dict.fromkeys(BUCKET_KINDS)
        #: Buckets by kind and configuration as the page words say, so that a load
        #: reuses them.
        self._made: dict[tuple[BucketKind, int, int, int], TokenBucket] = {}
        self._configs: dict[tuple[BucketConfig | None, BucketConfig | None],
                            RateLimitConfig] = {}
        #: Tokens charged (take) while the lock was busy: taken at the next locked call.
        self._owed_ops = 0
        self._owed_bytes = 0
        self._owed_lock = threading.Lock()
        #: Admissions that did not get the lock in time (waited LOCK_BUSY_WAIT_NS).
        self.lock_busy = 0
        self._closed = False
        self._close_requested = False

    # -- making and handing out --------------------------------------------------------

    @classmethod
    def create(cls, config: RateLimitConfig, *, clock: Clock = time.monotonic_ns,
               name: str | None = None) -> SharedRateLimiter:
        """A new group's shared state (the daemon), full buckets.

        :raises SharedLimiterError: the memfd cannot be made or mapped.
        """
        try:
            fd = os.memfd_create(f"avmm-rate-limit-{name or 'group'}",
                                 os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise SharedLimiterError(f"cannot make a rate-limit group's shared memory: "
                                     f"{e.strerror}") from None
        try:
            os.ftruncate(fd, STATE_SIZE)
            mapping = mmap.mmap(fd, STATE_SIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except OSError as e:
            os.close(fd)
            raise SharedLimiterError(f"cannot set up a rate-limit group's shared memory: "
                                     f"{e.strerror}") from None
        limiter = cls(fd, mapping, owner_config=config, clock=clock, name=name)
        _HEADER.pack_into(mapping, 0, _MAGIC)
        now = clock()
        for index, kind in enumerate(BUCKET_KINDS):
            bucket_config = getattr(config, kind)
            limiter._write_bucket(index, None if bucket_config is None
                                  else TokenBucket(bucket_config, now))
        return limiter

    @classmethod
    def attach(cls, fd: int, *, clock: Clock = time.monotonic_ns, name: str | None = None,
               lock_wait_s: float = ADMIT_LOCK_WAIT_S) -> SharedRateLimiter:
        """A worker's view of a group from ``fd`` (a description of its own, which this
        limiter now owns and closes): it must be a memfd of the state's size, sealed
        against shrinking.

        :raises SharedLimiterError: it is not (``fd`` is closed then).
        """
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK or os.fstat(fd).st_size < STATE_SIZE:
                raise SharedLimiterError("a rate-limit group's shared memory is not a "
                                         "sealed memfd of its size")
            mapping = mmap.mmap(fd, STATE_SIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise SharedLimiterError(f"cannot map a rate-limit group's shared memory: "
                                     f"{e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mapping, owner_config=None, clock=clock, name=name,
                   lock_wait_s=lock_wait_s)

    def handout_fd(self) -> int:
        """A new open file description of the state (its own OFD lock), for one other
        process; the caller closes it once handed over."""
        try:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise SharedLimiterError(f"cannot open a rate-limit group's shared memory "
                                     f"again: {e.strerror}") from None

    def close(self) -> None:
        """Unmap and close (the other processes keep their own mappings). Never waits: if
        a thread of this process holds the limiter (the daemon's change of the group,
        waiting for a worker's lock), that thread closes it when it lets go."""
        self._close_requested = True
        if not self._lock.threads.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._closed = True
                self._map.close()
                os.close(self._fd)
        finally:
            self._lock.threads.release()

    # -- RateLimiter's interface --------------------------------------------------------

    @property
    def config(self) -> RateLimitConfig:
        """The buckets' configuration: the daemon's own, or as the page says now."""
        if self._owner_config is not None:
            return self._owner_config
        lock = self._locked(read_only=True)
        with lock as ready, self._reading(ready, lock.exclusive) as buckets:
            key = tuple(None if (bucket := buckets.get(kind)) is None else bucket.config
                        for kind in BUCKET_KINDS)
        config = self._configs.get(key)  # type: ignore[arg-type]
        if config is None:
            if len(self._configs) > 16:
                self._configs.clear()
            config = self._configs[key] = RateLimitConfig(  # type: ignore[index]
                bandwidth=key[0], ops=key[1])
        return config

    def reconfigure(self, config: RateLimitConfig) -> None:
        """Change the buckets for every process (the daemon; it waits for a change of
        this group in progress, then up to :data:`RECONFIGURE_LOCK_WAIT_S` for a
        worker's lock: call it from a thread): as :meth:`RateLimiter.reconfigure` (a
        bucket that stays keeps its level, capped at the new size; a new one starts
        full; the burst anew), but a debt carried over is cut to one bucket (``-size``
        tokens): a worker can write any debt into the page, and an operator's ``PUT``
        must give the group's VMs service back within about one refill period, not
        after the refill of that debt (see :data:`~avmm.ratelimit._bucket.DEBT_MAX`)."""
        with self._locked(force=True) as ready:
            if not ready:
                return  # closed
            now = self.clock()
            self._load(now)
            for index, kind in enumerate(BUCKET_KINDS):
                bucket_config = getattr(config, kind)
                self._write_bucket(index, replace_bucket(
                    self._buckets[kind], bucket_config, now,
                    debt_max=None if bucket_config is None else bucket_config.size))
            if self._owner_config is not None:
                self._owner_config = config

    def check(self, ops: int, nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
        with self._locked() as ready:
            if not ready:
                return self._busy()
            self._current(now_ns)
            result = check_buckets(self._buckets["bandwidth"], self._buckets["ops"], ops,
                                   nbytes, now_ns)
            self._store()
            return result

    def try_take(self, ops: int, nbytes: int, now_ns: int) -> tuple[int, BucketKind | None]:
        with self._locked() as ready:
            if not ready:
                return self._busy()
            self._current(now_ns)
            bandwidth, ops_bucket = self._buckets["bandwidth"], self._buckets["ops"]
            wait, kind = check_buckets(bandwidth, ops_bucket, ops, nbytes, now_ns)
            if not wait:
                take_buckets(bandwidth, ops_bucket, ops, nbytes, now_ns)
            self._store()
            return wait, kind

    def take(self, ops: int, nbytes: int, now_ns: int) -> None:
        with self._locked() as ready:
            with self._owed_lock:
                self._owed_ops += ops
                self._owed_bytes += nbytes
            if ready:
                self._load(now_ns)
                self._settle(now_ns)
                self._store()
            else:
                self.lock_busy += 1

    def levels(self) -> dict[str, int]:
        """Whole tokens in each bucket now (negative: debt), read from the page (under
        the lock if it comes in time, else as the page is: clamped either way)."""
        now = self.clock()
        lock = self._locked(read_only=True)
        with lock as ready, self._reading(ready, lock.exclusive, now) as buckets:
            return {kind: bucket.level_at(now) for kind, bucket in buckets.items()
                    if bucket is not None}

    # -- the page ------------------------------------------------------------------------

    def _locked(self, *, read_only: bool = False, force: bool = False) -> _Held:
        if force:
            # The daemon's change (PUT, in a thread): one at a time, whatever the wait
            # for the one before; a worker's OFD lock is waited for a little.
            return _Held(self, None, RECONFIGURE_LOCK_WAIT_S, proceed=True, force=True)
        # The daemon's reads (GET /rate_limit_groups, on its event loop) try the thread
        # lock once too: without it they read the page as it is anyway.
        threads_wait_s = 0.0 if read_only and self._owner_config is not None \
            else self._lock_wait_s
        return _Held(self, threads_wait_s, 0.0, proceed=read_only)

    def _busy(self) -> tuple[int, BucketKind | None]:
        self.lock_busy += 1
        # The page's word for which buckets exist (read unlocked: a hint for the wait's
        # accounting only).
        kind = None if self._closed else next(
            (kind for index, kind in enumerate(BUCKET_KINDS)
             if _CONFIG.unpack_from(self._map, _slot(index))[0]), None)
        return LOCK_BUSY_WAIT_NS, kind

    def _current(self, now_ns: int) -> None:
        """The buckets as the page has them now (the lock held), with what was charged
        while the lock was busy taken first."""
        self._load(now_ns)
        if self._owed_ops or self._owed_bytes:
            self._settle(now_ns)

    def _settle(self, now_ns: int) -> None:
        with self._owed_lock:
            ops, nbytes, self._owed_ops, self._owed_bytes = \
                self._owed_ops, self._owed_bytes, 0, 0
        take_buckets(self._buckets["bandwidth"], self._buckets["ops"], ops, nbytes, now_ns)

    @contextlib.contextmanager
    def _reading(self, ready: bool | None, exclusive: bool, now_ns: int | None = None,
                 ) -> Iterator[dict[BucketKind, TokenBucket | None]]:
        """The buckets as the page says (none once closed), for a look that changes
        nothing: holding this process's thread lock (``exclusive``), in this limiter's
        buckets, or without it, in buckets of its own (a thread that holds the lock may
        be using this limiter's)."""
        if ready is None:
            yield {}
            return
        now = self.clock() if now_ns is None else now_ns
        if exclusive:
            self._load(now)
            yield dict(self._buckets)
        else:
            buckets: dict[BucketKind, TokenBucket | None] = dict.fromkeys(BUCKET_KINDS)
            self._load(now, into=buckets)
            yield buckets

    def _load(self, now_ns: int,
              into: dict[BucketKind, TokenBucket | None] | None = None) -> None:
        """The buckets as the page says, every value clamped (see the module docstring),
        into this limiter's (under the lock) or into fresh ones in ``into``."""
        page = self._map
        target = self._buckets if into is None else into
        for index, kind in enumerate(BUCKET_KINDS):
            base = _slot(index)
            present, size, refill_ms, burst = _CONFIG.unpack_from(page, base)
            if not present:
                target[kind] = None
                continue
            key = (kind, size, refill_ms, burst)
            bucket = self._made.get(key) if into is None else None
            if bucket is None:
                config = BucketConfig(size=_clamp(size, 1, BUCKET_SIZE_MAX),
                                      refill_ms=_clamp(refill_ms, 1, REFILL_MS_MAX),
                                      one_time_burst=_clamp(burst, 0, BUCKET_SIZE_MAX))
                bucket = TokenBucket(config, now_ns)
                if into is None:
                    if len(self._made) > 16:
                        self._made.clear()
                    self._made[key] = bucket
            level = int.from_bytes(
                page[base + _LEVEL_OFFSET:base + _LEVEL_OFFSET + _LEVEL_BYTES], "little",
                signed=True)
            burst_left, last_ns = _TAIL.unpack_from(page, base + _TAIL_OFFSET)
            bucket.load(level, burst_left, last_ns, now_ns)
            target[kind] = bucket

    def _store(self) -> None:
        """The buckets' state back into the page (never their configuration: that is
        the daemon's to write)."""
        for index, kind in enumerate(BUCKET_KINDS):
            bucket = self._buckets[kind]
            if bucket is not None:
                self._write_state(_slot(index), bucket)

    def _write_state(self, base: int, bucket: TokenBucket) -> None:
        level, burst, last_ns = bucket.state()
        level = _clamp(level, -_LEVEL_MAX, _LEVEL_MAX)
        self._map[base + _LEVEL_OFFSET:base + _LEVEL_OFFSET + _LEVEL_BYTES] = \
            level.to_bytes(_LEVEL_BYTES, "little", signed=True)
        _TAIL.pack_into(self._map, base + _TAIL_OFFSET, _clamp(burst, 0, BUCKET_SIZE_MAX),
                        _clamp(last_ns, -_LAST_MAX, _LAST_MAX))

    def _write_bucket(self, index: int, bucket: TokenBucket | None) -> None:
        base = _slot(index)
        if bucket is None:
            _CONFIG.pack_into(self._map, base, 0, 0, 0, 0)
            return
        config = bucket.config
        _CONFIG.pack_into(self._map, base, 1, config.size, config.refill_ms,
                          config.one_time_burst)
        self._write_state(base, bucket)


class _Held:
    """``with limiter._locked() as ready``: ``ready`` is True with the lock held, False
    if it did not come in time, None once the limiter is closed. With ``proceed``, the
    body runs when the OFD lock did not come, holding the thread lock if that came (the
    daemon's forced rewrite, which always waits for it), or nothing (a read of the page:
    see ``into`` in :meth:`SharedRateLimiter._load`), and ``ready`` is True."""

    __slots__ = ("_force", "_held", "_limiter", "_ofd_wait_s", "_proceed",
                 "_threads_wait_s")

    def __init__(self, limiter: SharedRateLimiter, threads_wait_s: float | None,
                 ofd_wait_s: float, *, proceed: bool, force: bool = False) -> None:
        self._limiter = limiter
        self._threads_wait_s = threads_wait_s
        self._ofd_wait_s = ofd_wait_s
        self._proceed = proceed
        self._force = force
        self._held = _NOTHING

    def __enter__(self) -> bool | None:
        limiter = self._limiter
        if limiter._closed or limiter._close_requested:
            return None
        self._held = limiter._lock.acquire(self._threads_wait_s, self._ofd_wait_s,
                                           keep_threads=self._proceed)
        if limiter._closed or limiter._close_requested:  # closed while this waited
            self.__exit__()
            return None
        if self._held == _BOTH:
            return True
        if self._proceed:
            if self._force:
                log.warning("a rate-limit group's lock was held too long by another "
                            "process; its shared state is rewritten without it",
                            group=limiter.name)
            return True
        return False

    @property
    def exclusive(self) -> bool:
        """The body runs holding at least this process's thread lock."""
        return self._held != _NOTHING

    def __exit__(self, *_exc: object) -> None:
        held, self._held = self._held, _NOTHING
        limiter = self._limiter
        limiter._lock.release(held)
        if held != _NOTHING and limiter._close_requested and not limiter._closed:
            limiter.close()  # asked for while this thread held it
