"""Address buses: guest PIO and MMIO address ranges mapped to device handlers.

A vCPU thread that gets a PIO or MMIO exit from KVM calls :meth:`Bus.read` or
:meth:`Bus.write` synchronously on its own thread. The bus finds the device whose range
holds the address and calls the device with the *offset* inside that range: a device never
learns where it is mapped, so the same device can sit at any base.

The map of ranges is immutable and replaced whole on :meth:`Bus.insert` and
:meth:`Bus.remove` (the rust-vmm way). Lookups read the current map without a lock and
bisect over its sorted starts, so lookups are O(log n) and never wait for a writer; several
vCPU threads may call :meth:`Bus.read` / :meth:`Bus.write` at once.

A misbehaving guest never crashes the VMM through the bus: an access that hits no device,
or that runs over the edge of a device's range, is "unclaimed" (reads see all-ones like an
open bus, writes are dropped) and counted; a device handler that raises is logged and
treated the same way.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, final

import structlog

from avmm.errors import AvmmError

log = structlog.get_logger(__name__)

__all__ = ["Bus", "BusDevice", "BusError", "BusRange", "BusStats"]


class BusError(AvmmError):
    """A device range cannot be mapped on (or removed from) a bus.

    This is always the VMM's own wiring mistake (overlapping ranges, an empty range, a
    base that holds no mapping), never the guest's doing.
    """


class BusDevice(Protocol):
    """What a bus calls. Offsets are relative to the start of the device's range.

    Both methods run on a vCPU thread (possibly several at once) and must be short, must
    not block and must not await; a device guards its own state with a lock.
    """

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes read at ``offset`` (``size`` is 1..8 in practice)."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Handle a write of ``data`` at ``offset``. ``data`` must not be kept."""
        ...


@final
@dataclass(frozen=True, slots=True)
class BusRange:
    """One mapping: ``device`` answers for guest addresses ``base`` .. ``end - 1``."""

    base: int
    length: int
    name: str
    device: BusDevice

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.base + self.length

    def describe(self) -> str:
        return f"{self.name!r} at 0x{self.base:x}..0x{self.end - 1:x}"


@final
@dataclass(frozen=True, slots=True)
class BusStats:
    """Counters of accesses the bus could not hand to a device (for metrics).

    ``crossing_*`` and ``handler_errors`` are also counted in ``unclaimed_*``.
    """

    unclaimed_reads: int = 0
    unclaimed_writes: int = 0
    crossing_reads: int = 0
    crossing_writes: int = 0
    handler_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Map:
    """The immutable lookup table: ``starts[i]`` is ``ranges[i].base``, both sorted.

    ``quiet_reads``/``quiet_writes`` hold ``(address, size)`` of stray accesses that hit
    no range at all and were already counted and logged (or not logged, past the
    limit) once under this map: a repeat only needs counting. Guests repeat stray
    accesses in loops (port 0x80 delays, probes), so this is worth a shortcut. The sets
    belong to one map, so a new map (insert, remove) starts them afresh.
    """

    starts: tuple[int, ...]
    ranges: tuple[BusRange, ...]
    quiet_reads: set[tuple[int, int]] = field(default_factory=set)
    quiet_writes: set[tuple[int, int]] = field(default_factory=set)

_LOGGED_KEYS_LIMIT = 4096
"""How many distinct stray accesses a bus logs before it only counts them."""


@final
class Bus:
    """A set of non-overlapping device ranges on one address space (PIO or MMIO).

    ``name`` (for example ``"pio"`` or ``"mmio"``) appears in log lines and errors.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._map = _Map((), ())
        # Serialises writers of the map; readers never take it.
        self._map_lock = threading.Lock()
        # Guards the counters; only taken on the (rare) unclaimed path.
        self._stats_lock = threading.Lock()
        self._unclaimed_reads = 0
        self._unclaimed_writes = 0
        self._crossing_reads = 0
        self._crossing_writes = 0
        self._handler_errors = 0
        self._logged_keys: set[tuple[object, ...]] = set()
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Bus {self.name!r} with {len(self._map.ranges)} ranges>"

    # -- the map ---------------------------------------------------------------------------

    def insert(self, device: BusDevice, base: int, length: int, *, name: str) -> BusRange:
        """Map ``device`` at ``base`` .. ``base + length - 1`` and return the mapping.

        Raises :class:`BusError` for a non-positive length, a negative base, or a range
        that overlaps an existing mapping (the message names both devices).
        """
        if length <= 0:
            raise BusError(
                f"cannot map {name!r} at 0x{base:x} on the {self.name} bus: "
                f"length {length} is not positive"
            )
        if base < 0:
            raise BusError(f"cannot map {name!r} on the {self.name} bus: base {base} is negative")
        new = BusRange(base, length, name, device)
        with self._map_lock:
            current = self._map
            index = bisect_right(current.starts, base)
            # Only the neighbours can overlap: the last range starting at or before
            # ``base`` and the first one starting after it.
            for neighbour_index in (index - 1, index):
                if 0 <= neighbour_index < len(current.ranges):
                    neighbour = current.ranges[neighbour_index]
                    if neighbour.base < new.end and new.base < neighbour.end:
                        raise BusError(
                            f"cannot map {new.describe()} on the {self.name} bus: "
                            f"it overlaps {neighbour.describe()}"
                        )
            ranges = (*current.ranges[:index], new, *current.ranges[index:])
            self._map = _Map(tuple(r.base for r in ranges), ranges)
            self._changed()
        log.debug("bus range mapped", bus=self.name, device=name, base=hex(base), length=length)
        return new

    def remove(self, base: int) -> BusRange:
        """Unmap the range that starts exactly at ``base`` and return it.

        Raises :class:`BusError` if no range starts there.
        """
        with self._map_lock:
            current = self._map
            index = bisect_right(current.starts, base) - 1
            if index < 0 or current.starts[index] != base:
                raise BusError(f"nothing is mapped at 0x{base:x} on the {self.name} bus")
            removed = current.ranges[index]
            ranges = current.ranges[:index] + current.ranges[index + 1 :]
            self._map = _Map(tuple(r.base for r in ranges), ranges)
            self._changed()
        log.debug("bus range unmapped", bus=self.name, device=removed.name, base=hex(base))
        return removed

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every :meth:`insert` and :meth:`remove`, once the new
        map is in place (on the thread that changed it, with the bus's map lock held:
        it must be short and must not touch this bus's map). For whoever caches what
        the map said, such as a vCPU's C fast path for unclaimed accesses."""
        with self._map_lock:
            self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception:
                log.exception("bus change listener failed", bus=self.name)

    def lookup(self, address: int) -> BusRange | None:
        """The mapping that holds ``address``, or ``None``. O(log n), lock-free."""
        current = self._map
        index = bisect_right(current.starts, address) - 1
        if index < 0:
            return None
        found = current.ranges[index]
        return found if address < found.end else None

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        """All mappings, sorted by base (a snapshot)."""
        return self._map.ranges

    def __len__(self) -> int:
        return len(self._map.ranges)

    # -- accesses --------------------------------------------------------------------------

    def read(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes at guest ``address``; always returns ``size`` bytes.

        Unclaimed addresses, accesses running over a range's edge and device handlers that
        raise (or return the wrong number of bytes) all read as ``0xff`` bytes: the handler's
        exception is caught (any :class:`Exception`), logged with the device name and
        address, and counted, so a device bug cannot kill the vCPU thread. Each distinct
        stray access is logged once; the counters see all of them.
        """
        current = self._map
        index = bisect_right(current.starts, address) - 1
        if index >= 0:
            mapping = current.ranges[index]
            offset = address - mapping.base
            if offset + size <= mapping.length:
                try:
                    data = mapping.device.read(offset, size)
                except Exception:
                    self._handler_failed(mapping, address, size, "read")
                    return b"\xff" * size
                if len(data) != size:
                    key = ("wrong size", mapping.name, address, size)
                    if self._count(key, write=False, handler_error=True):
                        log.error(
                            "bus device returned the wrong number of bytes",
                            bus=self.name,
                            device=mapping.name,
                            address=hex(address),
                            size=size,
                            returned=len(data),
                        )
                    return b"\xff" * size
                return data
        if (address, size) in current.quiet_reads:
            with self._stats_lock:
                self._unclaimed_reads += 1
        else:
            self._unclaimed(current, index, address, size, write=False)
        return b"\xff" * size

    def write(self, address: int, data: bytes) -> bool:
        """Write ``data`` at guest ``address``; ``False`` if no device took it.

        Unclaimed addresses and accesses running over a range's edge are dropped; a device
        handler that raises is caught (any :class:`Exception`), logged with the device name
        and address, counted, and reported as ``False``.
        """
        current = self._map
        index = bisect_right(current.starts, address) - 1
        if index >= 0:
            mapping = current.ranges[index]
            offset = address - mapping.base
            if offset + len(data) <= mapping.length:
                try:
                    mapping.device.write(offset, data)
                except Exception:
                    self._handler_failed(mapping, address, len(data), "write")
                    return False
                return True
        size = len(data)
        if (address, size) in current.quiet_writes:
            with self._stats_lock:
                self._unclaimed_writes += 1
        else:
            self._unclaimed(current, index, address, size, write=True)
        return False

    def is_quiet(self, address: int, size: int, *, write: bool) -> bool:
        """Whether an access of ``size`` bytes at ``address`` is a repeat of a stray
        access under the current map: it hits no range at all (not even partly) and has
        been counted and logged already. The bus answers it with nothing but a count, so
        a caller may answer it the same way without asking the bus again, as long as it
        forgets the answer when the map changes (:meth:`on_change`) and reports what it
        answered through :meth:`count_unclaimed`."""
        current = self._map
        return (address, size) in (current.quiet_writes if write else current.quiet_reads)

    def count_unclaimed(self, *, reads: int = 0, writes: int = 0) -> None:
        """Count unclaimed accesses that were answered without the bus (see
        :meth:`is_quiet`)."""
        if reads or writes:
            with self._stats_lock:
                self._unclaimed_reads += reads
                self._unclaimed_writes += writes

    # -- counters --------------------------------------------------------------------------

    def stats(self) -> BusStats:
        """A consistent snapshot of the unclaimed-access counters."""
        with self._stats_lock:
            return BusStats(
                unclaimed_reads=self._unclaimed_reads,
                unclaimed_writes=self._unclaimed_writes,
                crossing_reads=self._crossing_reads,
                crossing_writes=self._crossing_writes,
                handler_errors=self._handler_errors,
            )

    def _count(
        self,
        log_key: tuple[object, ...],
        *,
        write: bool,
        crossing: bool = False,
        handler_error: bool = False,
    ) -> bool:
        """Count one unclaimed access; return whether to log it.

        Each distinct ``log_key`` is logged once (up to :data:`_LOGGED_KEYS_LIMIT` keys),
        because guests repeat the same stray access many times (Linux's port 0x80 delay
        writes, probes of absent UARTs) and a log line per access would cost more than
        the exit itself. The counters see every access.
        """
        with self._stats_lock:
            if write:
                self._unclaimed_writes += 1
                self._crossing_writes += crossing
            else:
                self._unclaimed_reads += 1
                self._crossing_reads += crossing
            self._handler_errors += handler_error
            if log_key in self._logged_keys or len(self._logged_keys) >= _LOGGED_KEYS_LIMIT:
                return False
            self._logged_keys.add(log_key)
            return True

    def _unclaimed(
        self, current: _Map, index: int, address: int, size: int, *, write: bool
    ) -> None:
        end = address + size
        access = "write" if write else "read"
        crossing: BusRange | None = None
        # ``index`` is the last range starting at or before ``address``: the access crosses
        # its end if it starts inside it, or crosses the next range's start if it reaches it.
        if index >= 0 and address < current.ranges[index].end:
            crossing = current.ranges[index]
        elif index + 1 < len(current.ranges) and current.starts[index + 1] < end:
            crossing = current.ranges[index + 1]
        should_log = self._count(
            ("unclaimed", access, address, size), write=write, crossing=crossing is not None
        )
        if crossing is None:
            quiet = current.quiet_writes if write else current.quiet_reads
            if len(quiet) < _LOGGED_KEYS_LIMIT:
                quiet.add((address, size))
        if not should_log:
            return
        if crossing is not None:
            log.warning(
                "bus access crosses a device range edge",
                bus=self.name,
                device=crossing.name,
                access=access,
                address=hex(address),
                size=size,
                range_base=hex(crossing.base),
                range_length=crossing.length,
            )
        else:
            log.debug(
                "unclaimed bus access",
                bus=self.name,
                access=access,
                address=hex(address),
                size=size,
            )

    def _handler_failed(self, mapping: BusRange, address: int, size: int, access: str) -> None:
        """Count and log (once per device, access kind and address) a raising handler.

        Must be called from inside the ``except`` block so the traceback is logged.
        """
        key = ("raised", mapping.name, access, address)
        if self._count(key, write=access == "write", handler_error=True):
            log.exception(
                "bus device handler raised",
                bus=self.name,
                device=mapping.name,
                access=access,
                address=hex(address),
                offset=address - mapping.base,
                size=size,
            )
