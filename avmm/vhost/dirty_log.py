"""The vhost-user dirty log (VHOST_USER_PROTOCOL_F_LOG_SHMFD, VHOST_F_LOG_ALL): both ends.

The log is a bitmap in shared memory, one bit per 4 KiB page of guest *physical*
address space from address 0 up to the end of the highest memory region: bit ``p % 8``
of byte ``p // 8`` stands for the page at guest address ``p * 4096``. The front-end
creates it (a memfd) and hands it over with SET_LOG_BASE; while VHOST_F_LOG_ALL is set
the back-end sets the bit of every page it writes, after the write.

Atomicity. Both ends touch the log at the same time (and QEMU gives one log to all its
vhost devices, so two back-ends may share a byte): bits are set with an atomic OR per
byte and read-and-cleared with an atomic exchange per 64-bit word, in C
(:mod:`avmm.vhost._log_build`), since a Python ``log[i] |= bit`` is a load and a store
that can lose a bit set in between. A bit set at any moment is either taken by the
current :meth:`FrontendLog.take` or stays for the next one; none is lost.

Why the front-end reads the log in place rather than swapping in a fresh memfd each
round (with SET_LOG_BASE, as Cloud Hypervisor does): the exchange per word is the
same guarantee at word granularity, needs no message on the connection the device task
owns (so :meth:`~avmm.vhost.frontend.VhostUserDevice.collect_dirty` is a plain call that
works from any thread, as the migration's collect needs), and does not depend on
when a back-end stops writing to the old mapping after it answers. QEMU reads its vhost
log the same way.

Hostile peers. The front-end seals its memfd (no shrink, no grow, no more seals)
before it goes out, so a back-end cannot make the front-end's mapping fault (SIGBUS).
The back-end maps the front-end's fd only if it is a regular file at least as large as
the log it describes, sealed against shrinking (see
:func:`avmm.vhost.backend.check_shared_fd`), and never marks a page the log does not
cover.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from .protocol import VHOST_LOG_PAGE

try:
    from ._log_ffi import ffi as _ffi
    from ._log_ffi import lib as _lib
except ImportError as e:  # pragma: no cover - the package was installed without it
    raise ImportError("avmm.vhost._log_ffi is not built: reinstall avmm (make venv, or "
                      "pip install -e .) so that its cffi extensions compile") from e

log = structlog.get_logger(__name__)

__all__ = ["MAX_LOG_SIZE", "BackendLog", "FrontendLog", "log_size_for"]

#: The largest log either end maps: 1 GiB of bits covers 32 TiB of guest addresses.
MAX_LOG_SIZE = 1 << 30
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class _Region(Protocol):
    guest_address: int
    size: int
    file_offset: int


def log_size_for(regions: Sequence[_Region]) -> int:
    """Bytes of log that cover guest addresses 0 to the end of the highest region,
    rounded up to whole pages (the log is mapped, and read in 64-bit words)."""
    end = max((region.guest_address + region.size for region in regions), default=0)
    pages = -(-end // VHOST_LOG_PAGE)
    size = -(-pages // 8)
    return max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)


class FrontendLog:
    """The front-end's log: a sealed memfd of ``log_size_for(regions)`` bytes, mapped
    here. :meth:`take` reads and clears it and translates guest physical pages to pages
    of the guest RAM file (``file_offset // 4096``, as :mod:`avmm.state.memory_file`
    numbers them) through ``regions``, which must be page aligned. Thread-safe."""

    def __init__(self, regions: Sequence[_Region], memory_size: int) -> None:
        for region in regions:
            if (region.guest_address | region.size | region.file_offset) % VHOST_LOG_PAGE:
                raise ValueError(f"memory region at guest 0x{region.guest_address:x} is "
                                 "not 4 KiB aligned")
            if region.file_offset + region.size > memory_size:
                raise ValueError(f"memory region at guest 0x{region.guest_address:x} ends "
                                 f"past the {memory_size} bytes of guest RAM")
        self.regions = tuple((r.guest_address // VHOST_LOG_PAGE, r.size // VHOST_LOG_PAGE,
                              r.file_offset // VHOST_LOG_PAGE) for r in regions)
        #: How many pages the guest RAM file has (page numbers are below it).
        self.pages = -(-memory_size // VHOST_LOG_PAGE)
        self.size = log_size_for(regions)
        if self.size > MAX_LOG_SIZE:
            raise ValueError(f"a dirty log of {self.size} bytes (at most {MAX_LOG_SIZE})")
        self._lock = threading.Lock()
        self.fd = os.memfd_create("avmm-vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._map: mmap.mmap | None = None
        self._words: Any = None
        try:
            os.ftruncate(self.fd, self.size)
            # Sealed before the back-end sees it: it cannot shrink the file under our
            # mapping (a SIGBUS here), nor grow it.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._words = _ffi.from_buffer("uint64_t[]", self._map)
        except BaseException:
            self.close()
            raise

    def take(self) -> int:
        """Read and clear the log; the guest RAM file pages it named, as an int bitset
        (bit ``n``: file page ``n``). Bits for guest addresses outside every region (a
        back-end's noise) are dropped."""
        words = self.size // 8
        with self._lock:
            if self._words is None:
                raise ValueError("the dirty log is closed")
            out = _ffi.new("uint64_t[]", words)
            found = _lib.avmm_log_take(self._words, out, words)
            if not found:
                return 0
            bits = int.from_bytes(_ffi.buffer(out), "little")
        pages = 0
        for guest_page, count, file_page in self.regions:
            part = (bits >> guest_page) & ((1 << count) - 1)
            if part:
                pages |= part << file_page
        return pages

    def dup_fd(self) -> int:
        """A copy of the log's fd, to send (the caller closes it); ValueError once the
        log is closed."""
        with self._lock:
            if self.fd < 0:
                raise ValueError("the dirty log is closed")
            return os.dup(self.fd)

    def close(self) -> None:
        with self._lock:
            words, self._words = self._words, None
            mapping, self._map = self._map, None
            fd, self.fd = self.fd, -1
        if words is not None:
            _ffi.release(words)
        if mapping is not None:
            mapping.close()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class BackendLog:
    """The back-end's view of a front-end's log (SET_LOG_BASE): ``size`` bytes at
    ``offset`` of ``fd``, mapped shared. The caller checks the fd (regular, large
    enough, sealed) before; ValueError or OSError if it cannot be mapped."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if not 0 < size <= MAX_LOG_SIZE:
            raise ValueError(f"a dirty log of {size} bytes (1 to {MAX_LOG_SIZE})")
        if offset < 0 or offset + size > 1 << 62:
            raise ValueError(f"a dirty log at offset {offset}")
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - aligned
        self.size = size
        self._map = mmap.mmap(fd, size + delta, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        self._view = memoryview(self._map)[delta:delta + size]
        self._bytes = _ffi.from_buffer("uint8_t[]", self._view)
        #: Writes the log did not cover (a front-end whose log is too small), counted
        #: under a lock: the queues' threads of a device mark the same log.
        self.missed = 0
        self._missed_lock = threading.Lock()

    def mark(self, address: int, length: int) -> bool:
        """Set the bits of every page of guest addresses ``address`` to ``address +
        length - 1`` (after the write they stand for). False (nothing set) if the log
        does not cover them all."""
        if length <= 0:
            return True
        first = address // VHOST_LOG_PAGE
        last = (address + length - 1) // VHOST_LOG_PAGE
        if address < 0 or last >= 1 << 64 \
                or _lib.avmm_log_mark(self._bytes, self.size, first, last) < 0:
            with self._missed_lock:
                self.missed += 1
                first_miss = self.missed == 1
            if first_miss:
                log.warning("a write to guest memory is past the end of the dirty log "
                            "(the front-end's log is too small): not logged",
                            address=hex(address), length=length, log_size=self.size)
            return False
        return True

    def close(self) -> None:
        _ffi.release(self._bytes)
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()
