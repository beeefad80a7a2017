"""Serve an avmm :class:`~avmm.virtio.device.VirtioDevice` to a vhost-user front-end.

``serve_device(device, path)`` listens on a unix socket and serves one front-end (QEMU,
Cloud Hypervisor, avmm) at a time. The front-end hands over guest RAM (memfds, mapped
here ``MAP_SHARED``), the rings' layout and positions, a kick eventfd per ring (the
driver's notifications) and a call eventfd per ring (interrupts to the driver). Once
every ring of the device is started (it has a kick fd) and enabled, the device's
``run()`` serves the queues exactly as it does in-process, through a
:class:`DeviceContext` built on those eventfds.

Queue threads. The context hands out each ring's kick eventfd (``kick_fd``), so net and
blk serve every queue from an I/O thread of their own, as they do in-process, and signal
the call eventfd from there. The front-end's requests are still handled on the event
loop, so whatever they change that such a thread uses is changed only where no thread
can see it half done: a new kick fd, a new memory table, an inflight area and a change
of dirty logging (a log, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG) stop the device first and
restart it after; a new call eventfd takes the old one's fd number (dup3), so a thread
never writes a closed or reused number, and a call fd that appears or goes away under a
running device restarts it too. A stop drops the queues' views of guest RAM on the event
loop, so an old memory table is unmapped there and then, never by a device thread (whose
seccomp filter has no ``close``).

Addresses. Buffers in descriptors are guest physical addresses, which
:class:`VhostMemory` translates through the memory table. Ring addresses in
SET_VRING_ADDR are the front-end's own virtual addresses; they are converted to guest
physical through the same table, so the unchanged :class:`VirtQueue` serves the rings.

Faults. A front-end that breaks the protocol (a malformed message, fds where none
belong) is dropped with a log line; the device is stopped and reset, and the next
front-end may connect. A well-formed request the back-end cannot honour (a ring size
above the device's maximum, a ring index out of range, features without
VIRTIO_F_VERSION_1, a kick fd that is not an eventfd, polling instead of a kick fd,
memory that is unsealed or too small, a config read past 256 bytes) is *refused*: the
state stays as it was, the front-end gets a non-zero REPLY_ACK answer when it asked for
one (GET_CONFIG gets an empty payload, vhost-user.rst's error answer), and the
connection stays up. A refused SET_FEATURES, SET_MEM_TABLE or per-ring setting leaves
the device unable to start until the same request succeeds, so that a front-end that
asked for no answer cannot run the device on settings it did not get. A driver that
breaks the virtqueue rules stops the device (DeviceNeedsReset): the error fd of each
ring is signalled, and the front-end must restart the rings. Nothing a peer does crashes
the back-end.

REPLY_ACK. vhost-user.rst gives NEED_REPLY a meaning only once REPLY_ACK is
negotiated, so before that the flag is ignored: a front-end that sets it on SET_OWNER,
or on a SET_PROTOCOL_FEATURES that does not ack REPLY_ACK, gets no answer it did not
expect (an unexpected one would be read as the reply to its next request). The
SET_PROTOCOL_FEATURES that acks REPLY_ACK is the one message in between: QEMU never
sets NEED_REPLY on it, and a front-end that does wants the answer (libvhost-user's,
DPDK's and rust-vmm's back-ends all give it), so it gets one.

Stop and restart. GET_VRING_BASE (and SET_VRING_ENABLE 0, a new memory table, a new
kick fd) stops the device without resetting it: its ``run`` is cancelled, then every
chain it took and had not returned is given back (:meth:`VirtQueue.give_back`: the
ring's position moves back over them, so they are taken again after the restart), and
GET_VRING_BASE answers the position of the next chain the device will take. A driver
buffer is never lost across a stop/start (QEMU's ``stop``/``cont``, a snapshot). The
device is reset only for RESET_OWNER/RESET_DEVICE and when the front-end goes away.

Memory. Guest RAM is mapped from the front-end's fds, so a front-end that shrank a file
afterwards would make every access to the lost part a SIGBUS that kills the back-end
(and every other front-end it would serve). SET_MEM_TABLE and SET_INFLIGHT_FD therefore
take only regular files (memfds, shared memory files) at least as large as the region,
sealed against shrinking (``F_SEAL_SHRINK``; QEMU's ``memory-backend-memfd`` seals by
default, avmm seals its guest RAM), unless ``allow_unsealed_memory`` (the CLI's
``--allow-unsealed-memory``) accepts unsealed ones from a front-end that is trusted not
to shrink them. The inflight area the back-end creates is sealed the same way.

Dirty logging (live migration; VHOST_USER_PROTOCOL_F_LOG_SHMFD and VHOST_F_LOG_ALL,
both offered). SET_LOG_BASE hands over the front-end's log (a memfd checked like guest
RAM, at most :data:`~avmm.vhost.dirty_log.MAX_LOG_SIZE` bytes, mapped shared); it is
always answered (0, or 1 for a log that cannot be used), since with LOG_SHMFD the
front-end waits for that answer. SET_FEATURES may toggle VHOST_F_LOG_ALL while the
device runs, and SET_VRING_ADDR may set or clear VHOST_VRING_F_LOG (with the used ring's
log address) on a running ring whose addresses stay the same: QEMU turns logging on and
off that way without stopping the rings. The back-end restarts the device around each
such change (see "Queue threads"; the driver sees nothing of it, though a received
frame that was waiting for more buffers is dropped, counted), so that once the request
is answered every page is logged. While VHOST_F_LOG_ALL is on and a log is set,
every page the device may have written is logged (:class:`_TrackedQueue`): when a chain
is returned to the used ring (or given back at a stop), all of its device-writable
buffers are marked, whatever the device wrote through (``chain.write``, views, preadv
into guest buffers), since a device writes a chain's buffers only while it holds the
chain; and with VHOST_VRING_F_LOG every used ring write (the element and idx of a
return, the flags or avail_event of notification suppression) is marked at the log
address the front-end gave. Marks come after the writes they stand for, with an atomic
OR per byte (see :mod:`avmm.vhost.dirty_log`: a Python ``|=`` could lose a bit that the
front-end or another back-end sets at the same moment). A write the log does not cover
(a front-end's log too small for its memory table) is counted and logged once.

Handshake. One front-end is served at a time, so a client that connects and sends
nothing would hold the back-end forever: until the front-end has sent both SET_OWNER
and GET_FEATURES (every front-end starts with them), each message must arrive within
:data:`HANDSHAKE_TIMEOUT_S` of the previous one (or of the connection), and any message,
once begun, must be complete within that time. A client that fails is dropped with a
log line naming its pid and uid (SO_PEERCRED). After the handshake a front-end may be
silent for as long as it likes (its guest has not set DRIVER_OK yet, or it is paused).

Device state (VHOST_USER_PROTOCOL_F_DEVICE_STATE, offered for every device). A front-end
that snapshots or migrates the device sends SET_DEVICE_STATE_FD with a direction and a
pipe (or socket) end, only while the rings are stopped (a running device refuses: its
state would move on under the transfer). Saving, the state (see
:mod:`avmm.vhost.device_state`: what blk keeps, and how any device with a
``save_state``/``restore_state``/``state_class`` takes part) is taken at once and written
into the pipe by a task of its own, so the connection stays responsive; loading, a task
reads to end-of-file, at most :data:`~avmm.vhost.device_state.MAX_DEVICE_STATE_SIZE`
bytes, then checks all of it against this device and applies it (only if the rings have
not been started meanwhile). Either way the transfer must end within
:data:`TRANSFER_TIMEOUT_S`. CHECK_DEVICE_STATE waits (as long again at most) for the
transfer and answers 0, or 1 with the reason logged: a front-end that sends too much,
never closes its end, sends garbage or a state of another disk gets a failure and a
usable connection, never a hang. The reply to SET_DEVICE_STATE_FD never carries an fd of
ours (the front-end's channel is used).

Inflight tracking (INFLIGHT_SHMFD). On GET_INFLIGHT_FD the back-end creates a memfd
with the split-queue layout of the vhost-user spec (per queue, 64-byte aligned: a
16-byte header ``features u64, version u16, desc_num u16, last_batch_head u16,
used_idx u16``, then ``desc_num`` 16-byte entries ``inflight u8, padding[5], next u16,
counter u64``) and hands it to the front-end, which keeps it and gives it back with
SET_INFLIGHT_FD on every start, also to a restarted back-end. Every chain taken from the
available ring is marked in flight (counter first, then the flag); every chain returned
is recorded as the last batch before its used entry is published, and cleared after, and
then ``used_idx`` follows the used ring. When rings start with a record that has been
used, the record is first reconciled with the used ring (``used_idx`` behind the ring's
idx: the last batch was published but not cleared, so it is cleared now), the device
continues taking chains at used idx + (chains in flight), and the chains still in flight
are handed to the device again, oldest (lowest counter) first, before any new one. The
hook is :class:`_TrackedQueue`, a :class:`VirtQueue` whose ``pop``/``push`` do the
bookkeeping, so devices need no change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ..devices._state import DeviceStateError
from ..errors import AvmmError, GuestAddressError
from ..eventfd import signal_eventfd, wait_eventfd
from ..memory import MemoryAccess
from ..paths import server_listens
from ..virtio.device import (
    COMMON_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceNeedsReset,
    VirtioDevice,
)
from ..virtio.queue import VirtQueue
from .device_state import MAX_DEVICE_STATE_SIZE, load_backend_state, save_backend_state
from .dirty_log import MAX_LOG_SIZE, BackendLog
from .protocol import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_PHASE_STOPPED,
    DEVICE_STATE_SAVE,
    EVENTFD_LINK,
    MAX_CONFIG_SIZE,
    REPLY_BODIES,
    STATUS_REPLIES,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    Message,
    ProtocolFeature,
    Request,
    VhostConnectionClosed,
    VhostProtocolError,
    VhostRequestRefused,
    receive_message,
    send_message,
)

log = structlog.get_logger(__name__)

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "OFFERED_PROTOCOL_FEATURES",
    "VhostBackendError",
    "VhostMemory",
    "serve_device",
]

#: Protocol features this back-end offers.
OFFERED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD) | (1 << ProtocolFeature.DEVICE_STATE)
    | (1 << ProtocolFeature.LOG_SHMFD)
)
#: How long a device state transfer (SET_DEVICE_STATE_FD until end-of-file) may take,
#: and how long CHECK_DEVICE_STATE waits for one still under way.
TRANSFER_TIMEOUT_S = 10.0
#: How long stopping a device may take before the connection is given up on.
STOP_TIMEOUT_S = 10.0
#: The most a front-end may take per message until its handshake is done, and for any
#: one message once begun (see the module docstring).
HANDSHAKE_TIMEOUT_S = 10.0
#: The answer to a refused request with NEED_REPLY (any non-zero value means failure).
_REFUSED = 1
#: Requests whose refusal leaves the device unable to start until the same request
#: (for the same ring) succeeds: it would otherwise run on a setting the front-end
#: believes it changed.
_SETTINGS = frozenset({
    Request.SET_FEATURES, Request.SET_MEM_TABLE, Request.SET_VRING_NUM,
    Request.SET_VRING_BASE, Request.SET_VRING_ADDR, Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
})
#: Seals the inflight area gets (the guest RAM needs F_SEAL_SHRINK at least).
_INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class VhostBackendError(AvmmError):
    """The back-end cannot serve at all (socket path unusable)."""


@dataclass
class _Region:
    guest_address: int
    size: int
    user_address: int
    map: mmap.mmap
    view: memoryview
    #: Where the region's first byte is in ``map`` (the fd offset's misalignment).
    map_offset: int = 0


def check_shared_fd(fd: int, needed: int, *, allow_unsealed: bool, what: str) -> None:
    """Refuse (VhostRequestRefused) an fd to map shared unless it is a regular file of at
    least ``needed`` bytes, sealed against shrinking (F_SEAL_SHRINK) unless
    ``allow_unsealed``: any part of a mapping past the end of its file, now or after the
    front-end shrank it, is a SIGBUS on first touch (see the module docstring)."""
    try:
        info = os.fstat(fd)
    except OSError as e:
        raise VhostRequestRefused(f"{what}: unusable fd: {e}") from e
    if not stat.S_ISREG(info.st_mode):
        raise VhostRequestRefused(f"{what}: not a regular file (a memfd or shared memory "
                                  "file is needed)")
    if info.st_size < needed:
        raise VhostRequestRefused(f"{what}: the file has {info.st_size} bytes, "
                                  f"{needed} are mapped")
    if allow_unsealed:
        return
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a file that can be sealed at all
    if not seals & fcntl.F_SEAL_SHRINK:
        raise VhostRequestRefused(
            f"{what}: the file is not sealed against shrinking (F_SEAL_SHRINK), so the "
            "front-end could crash this back-end; seal it (QEMU's memory-backend-memfd "
            "does by default) or start the back-end with --allow-unsealed-memory"
        )


class VhostMemory(MemoryAccess):
    """Guest RAM as mapped from a vhost-user memory table: guest physical addresses in,
    checked views out. Immutable: a new table makes a new object. An unusable table is
    refused (VhostRequestRefused) with every mapping made so far undone."""

    def __init__(self, regions: Sequence[Any], fds: Sequence[int], *,
                 allow_unsealed: bool = False) -> None:
        self._regions: list[_Region] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                self._map_region(region, fd, allow_unsealed)
        except BaseException:
            self.close()
            raise

    def _map_region(self, region: Any, fd: int, allow_unsealed: bool) -> None:
        size, offset = region.size, region.mmap_offset
        where = f"memory region at guest 0x{region.guest_address:x}"
        if size <= 0:
            raise VhostRequestRefused(f"{where}: size 0")
        if (region.guest_address + size > 1 << 64 or region.user_address + size > 1 << 64
                or offset + size > 1 << 63):
            raise VhostRequestRefused(f"{where}: wraps around the address space")
        for other in self._regions:
            if (region.guest_address < other.guest_address + other.size
                    and other.guest_address < region.guest_address + size):
                raise VhostRequestRefused(
                    f"memory regions at guest 0x{region.guest_address:x} and "
                    f"0x{other.guest_address:x} overlap"
                )
        check_shared_fd(fd, offset + size, allow_unsealed=allow_unsealed, what=where)
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - aligned
        try:
            mapping = mmap.mmap(fd, size + delta, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        except (OSError, ValueError, OverflowError) as e:
            raise VhostRequestRefused(
                f"cannot map {where} (+{size} bytes at fd offset {offset}): {e}"
            ) from e
        view = memoryview(mapping)[delta:delta + size]
        self._regions.append(_Region(region.guest_address, size, region.user_address,
                                     mapping, view, delta))

    def _find(self, address: int, length: int) -> _Region | None:
        if address < 0 or length < 0:
            return None
        for region in self._regions:
            start = address - region.guest_address
            if start >= 0 and start + length <= region.size:
                return region
        return None

    def contains(self, address: int, length: int = 1) -> bool:
        return self._find(address, length) is not None

    def host_buffers(self) -> tuple[tuple[int, int, Any, int], ...] | None:
        if not self._regions:
            return None
        return tuple((region.guest_address, region.size, region.map, region.map_offset)
                     for region in self._regions)

    def view(self, address: int, length: int) -> memoryview:
        region = self._find(address, length)
        if region is None:
            raise GuestAddressError(address, length)
        start = address - region.guest_address
        return region.view[start:start + length]

    def guest_address_of(self, user_address: int, length: int) -> int:
        """The guest physical address of the front-end's virtual ``user_address``, whose
        ``length`` bytes must lie in one region."""
        for region in self._regions:
            start = user_address - region.user_address
            if start >= 0 and start + length <= region.size:
                return region.guest_address + start
        raise VhostRequestRefused(
            f"ring at front-end address 0x{user_address:x} (+{length} bytes) is not in "
            "any memory region"
        )

    def close(self) -> None:
        regions, self._regions = self._regions, []
        for region in regions:
            region.view.release()
            with contextlib.suppress(BufferError):
                # A queue may still hold a view; the mapping then goes with the last one.
                region.map.close()


#: Inflight record layout (split queues): per-queue header, per-descriptor state.
_INFLIGHT_HEADER = struct.Struct("<QHHHH")
_DESC_STATE = struct.Struct("<B5xHQ")
_INFLIGHT_VERSION = 1
_INFLIGHT_ALIGNMENT = 64
#: A virtio descriptor: address, length, flags, next.
_DESCRIPTOR = struct.Struct("<QIHH")


def inflight_queue_region_size(queue_size: int) -> int:
    """Bytes one split queue takes in the inflight area (64-byte aligned)."""
    size = _INFLIGHT_HEADER.size + _DESC_STATE.size * queue_size
    return -(-size // _INFLIGHT_ALIGNMENT) * _INFLIGHT_ALIGNMENT


class _InflightQueue:
    """One queue's part of the inflight area (see the module docstring)."""

    def __init__(self, view: memoryview, desc_num: int) -> None:
        self.view = view
        self.desc_num = desc_num
        self.counter = 0

    def _field(self, offset: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<H", self.view, offset, value & 0xFFFF)
            return value
        return int(struct.unpack_from("<H", self.view, offset)[0])

    def _entry(self, head: int) -> int:
        return _INFLIGHT_HEADER.size + _DESC_STATE.size * head

    def taken(self, head: int) -> None:
        entry = self._entry(head)
        self.counter += 1
        struct.pack_into("<Q", self.view, entry + 8, self.counter)
        self.view[entry] = 1

    def untaken(self, head: int) -> None:
        """The chain went back to the available ring (a stop): not in flight any more."""
        self.view[self._entry(head)] = 0

    def returning(self, head: int) -> None:
        self._field(12, head)  # last_batch_head: a batch of one

    def returned(self, head: int, used_idx: int) -> None:
        self.view[self._entry(head)] = 0
        self._field(14, used_idx)

    def recover(self, ring_used_idx: int, ring_size: int) -> list[int]:
        """Reconcile with the used ring; the heads still in flight, oldest first."""
        if self._field(8) != _INFLIGHT_VERSION:
            # A fresh record: nothing was ever in flight.
            self.view[:] = bytes(len(self.view))
            self._field(8, _INFLIGHT_VERSION)
            self._field(10, self.desc_num)
            self._field(14, ring_used_idx)
            return []
        if self._field(14) != ring_used_idx:
            # The last batch reached the used ring, its flags were not cleared yet.
            last = self._field(12)
            if last < self.desc_num:
                self.view[self._entry(last)] = 0
            self._field(14, ring_used_idx)
        found: list[tuple[int, int]] = []
        for head in range(self.desc_num):
            inflight, _next, counter = _DESC_STATE.unpack_from(self.view, self._entry(head))
            if inflight:
                if head >= ring_size:
                    raise VhostProtocolError(f"inflight record names descriptor {head} of "
                                             f"a {ring_size}-entry ring")
                found.append((counter, head))
        found.sort()
        self.counter = max((counter for counter, _ in found), default=0)
        return [head for _, head in found]


class _TrackedQueue(VirtQueue):
    """A VirtQueue that keeps the inflight record, hands recovered chains out first, and
    logs the pages of guest memory it returns written (see the module docstring, "Dirty
    logging")."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.inflight: _InflightQueue | None = None
        self.resubmit: list[int] = []
        #: The dirty log while VHOST_F_LOG_ALL is on (else None), and the used ring's
        #: log address while VHOST_VRING_F_LOG is set for this ring.
        self.write_log: BackendLog | None = None
        self.used_log_address: int | None = None
        # The device-writable buffers of each chain held, by head: logged when it is
        # returned or given back. Kept whether or not logging is on: a chain taken
        # before logging started may be written and returned after.
        self._writable: dict[int, tuple[Any, ...]] = {}

    def pop(self, memory: Any) -> Any:
        if self.resubmit and self.state.ready:
            head = self.resubmit.pop(0)
            self._map_rings(memory)
            chain = self._walk(memory, head,
                               _DESCRIPTOR.unpack_from(self._table_view, head << 4))
        else:
            chain = super().pop(memory)
            if chain is not None and self.inflight is not None:
                self.inflight.taken(chain.head)
        if chain is not None and chain.writable:
            self._writable[chain.head] = chain.writable
        return chain

    def may_take(self) -> bool:
        # A C loop (avmm.virtio.net_fast, blk_fast) takes and returns chains without pop
        # and push: only while they would do nothing more, with no inflight record, no
        # chain to resubmit and no dirty log. Each is set by a front-end message, and
        # only while the device is stopped (SET_INFLIGHT_FD and a change of logging stop
        # it first), so a queue thread never sees one change in the middle of a batch.
        return (super().may_take() and self.inflight is None and not self.resubmit
                and self.write_log is None and self.used_log_address is None)

    def _untaken(self, head: int) -> None:
        # Taken again from the available ring after the restart: not to be resubmitted
        # from the record too. A resubmitted chain the device still held at a stop was
        # not taken from the ring (pop above): it stays in flight in the record and is
        # resubmitted again at the next start.
        if self.inflight is not None:
            self.inflight.untaken(head)
        # The device may have written into it before the stop.
        self._log_writable(head)

    def push(self, memory: Any, head: int, written: int) -> None:
        tracker = self.inflight
        if tracker is not None:
            tracker.returning(head)
        super().push(memory, head, written)
        if tracker is not None:
            tracker.returned(head, self.state.next_used)
        self._log_writable(head)
        if self.used_log_address is not None and self.write_log is not None:
            slot = (self.state.next_used - 1) & (self.state.size - 1)
            self._log_used(4 + 8 * slot, 8)
            self._log_used(2, 2)

    def disable_notifications(self, memory: Any) -> None:
        super().disable_notifications(memory)
        if not self.state.event_idx:
            self._log_used(0, 2)  # the used ring's flags

    def enable_notifications(self, memory: Any) -> bool:
        found = super().enable_notifications(memory)
        if self.state.event_idx:
            self._log_used(4 + 8 * self.state.size, 2)  # avail_event
        else:
            self._log_used(0, 2)
        return found

    def reset(self) -> None:
        super().reset()
        self._writable.clear()

    def _log_writable(self, head: int) -> None:
        writable = self._writable.pop(head, ())
        log = self.write_log
        if log is not None:
            for address, length in writable:
                log.mark(address, length)

    def _log_used(self, offset: int, length: int) -> None:
        log, address = self.write_log, self.used_log_address
        if log is not None and address is not None:
            log.mark(address + offset, length)


@dataclass
class _Ring:
    queue: VirtQueue
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    #: Front-end virtual addresses from SET_VRING_ADDR (None: not set yet).
    addresses: tuple[int, int, int] | None = None
    #: The used ring's guest address for the dirty log (SET_VRING_ADDR with
    #: VHOST_VRING_F_LOG), None without the flag.
    log_address: int | None = None

    @property
    def started(self) -> bool:
        return self.kick_fd >= 0 and self.addresses is not None

    def close(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close_attr(self, name)


def _close_attr(obj: object, name: str) -> None:
    fd = getattr(obj, name)
    if fd >= 0:
        setattr(obj, name, -1)
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class _WithFds:
    """A reply payload that goes with fds (closed here once sent)."""

    payload: Any
    fds: list[int]


@dataclass
class _Transfer:
    """A device state transfer (SET_DEVICE_STATE_FD) and, once ``done``, its outcome."""

    direction: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    size: int = 0


@dataclass
class _RunningDevice:
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)


class _Context:
    """The DeviceContext of a device behind vhost-user."""

    def __init__(self, memory: VhostMemory, rings: Sequence[_Ring], features: int) -> None:
        self.memory = memory
        self.features = features
        self.queues = [ring.queue for ring in rings]
        self._rings = rings
        # The first wait returns at once: the driver may have kicked before we listened.
        self._primed = [True] * len(rings)

    def kick_fd(self, queue_index: int) -> int:
        """The ring's kick eventfd, for a device that serves the queue from an I/O
        thread of its own (net, blk). It stays open and the same while the device runs:
        SET_VRING_KICK and GET_VRING_BASE stop the device before they close it."""
        return self._rings[queue_index].kick_fd

    def call_fd(self, queue_index: int) -> int:
        """The ring's call eventfd (-1: none), which ``signal_used`` writes: for the
        syscall filter of a queue thread. Its number stays the same while the device
        runs (see the module docstring, "Queue threads")."""
        return self._rings[queue_index].call_fd

    async def wait_kick(self, queue_index: int) -> None:
        if self._primed[queue_index]:
            self._primed[queue_index] = False
            await trio.lowlevel.checkpoint()
            return
        await wait_eventfd(self._rings[queue_index].kick_fd)

    def signal_used(self, queue_index: int) -> None:
        ring = self._rings[queue_index]
        if ring.queue.should_notify(self.memory):
            signal_eventfd(ring.call_fd)

    def signal_config_change(self) -> None:
        # Needs BACKEND_REQ (a back-end → front-end channel), which we do not offer.
        log.debug("config change not delivered: no back-end request channel")


class _Session:
    """One front-end connection: its negotiated state, the memory and the rings."""

    def __init__(self, device: VirtioDevice, sock: Any, nursery: trio.Nursery, *,
                 allow_unsealed_memory: bool = False) -> None:
        self.device = device
        self.sock = sock
        self.nursery = nursery
        self.allow_unsealed_memory = allow_unsealed_memory
        self.features = 0
        self.protocol_features = 0
        self.memory: VhostMemory | None = None
        self.rings = [_Ring(_TrackedQueue(size)) for size in device.queue_max_sizes]
        #: The inflight area from GET/SET_INFLIGHT_FD: (mapping, queue_size).
        self.inflight: tuple[mmap.mmap, memoryview, int, int] | None = None
        self.running: _RunningDevice | None = None
        self.offered_features = (device.device_features() | COMMON_FEATURES
                                 | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        #: Settings whose last request was refused, by (request, ring index or None):
        #: the device does not start while any is here (see the module docstring).
        self.refused: dict[tuple[Request, int | None], str] = {}
        self._start_refused_logged: dict[tuple[Request, int | None], str] = {}
        #: The handshake requests not seen yet (see the module docstring).
        self.handshake_missing = {Request.SET_OWNER, Request.GET_FEATURES}
        #: The device state transfer under way or last finished (DEVICE_STATE).
        self.transfer: _Transfer | None = None
        #: The front-end's dirty log (SET_LOG_BASE), see the module docstring.
        self.log: BackendLog | None = None

    # -- lifetime -----------------------------------------------------------------------

    async def serve(self) -> None:
        while True:
            # Before the handshake is done, the wait for the next message is bounded too.
            try:
                if self.handshake_missing:
                    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                        await trio.lowlevel.wait_readable(self.sock)
                else:
                    await trio.lowlevel.wait_readable(self.sock)
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    message = await receive_message(self.sock)
            except VhostConnectionClosed:
                log.info("front-end disconnected")
                return
            except trio.TooSlowError:
                missing = sorted(request.name for request in self.handshake_missing)
                raise VhostProtocolError(
                    f"no complete message within {HANDSHAKE_TIMEOUT_S:g} s"
                    + (f" (handshake not done: no {' or '.join(missing)} yet)" if missing
                       else "")
                ) from None
            self.handshake_missing.discard(message.request)
            try:
                await self.handle(message)
            finally:
                message.close_fds()

    async def close(self) -> None:
        self._abort_transfer()
        try:
            with trio.CancelScope(shield=True):
                await self.stop_device()
        finally:
            running = self.running
            if running is not None:
                # It did not stop in time: a queue thread is still in a batch (a slow
                # disk) and uses the rings, guest RAM, the log and the inflight area
                # until it ends, which it does at the end of that batch. Then, as after
                # any stop, the chains go back and the queues let go of guest RAM, so
                # that it is unmapped below, here, and not by a later device thread.
                waited = 0.0
                with trio.CancelScope(shield=True):
                    while not running.stopped.is_set():
                        log.warning("waiting for the device's threads to end their batch",
                                    waited_s=waited)
                        with trio.move_on_after(STOP_TIMEOUT_S):
                            await running.stopped.wait()
                        waited += STOP_TIMEOUT_S
                self._stopped()
            # Whether or not the device stopped in time: the next front-end starts
            # with a fresh device, and nothing of this one's is kept open.
            self.device.reset()
            for ring in self.rings:
                ring.close()
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            self._forget_inflight()
            self._forget_log()

    def _forget_log(self) -> None:
        log_area, self.log = self.log, None
        self._update_logging()
        if log_area is not None:
            log_area.close()

    def _update_logging(self) -> None:
        """Point every queue at the log while VHOST_F_LOG_ALL is on and a log is set."""
        active = self.log if self.features & VHOST_F_LOG_ALL else None
        for ring in self.rings:
            queue = ring.queue
            if isinstance(queue, _TrackedQueue):
                queue.write_log = active
                queue.used_log_address = ring.log_address if active is not None else None

    def _forget_inflight(self) -> None:
        inflight, self.inflight = self.inflight, None
        for ring in self.rings:
            queue = ring.queue
            if isinstance(queue, _TrackedQueue):
                queue.inflight = None
                queue.resubmit = []
        if inflight is not None:
            mapping, view, _, _ = inflight
            view.release()
            with contextlib.suppress(BufferError):
                mapping.close()

    # -- the device task ----------------------------------------------------------------

    def _protocol_negotiated(self) -> bool:
        return bool(self.features & VHOST_USER_F_PROTOCOL_FEATURES)

    def _reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def maybe_start(self) -> None:
        """Start the device once every ring is started and enabled and nothing that
        matters was refused. A ring layout outside the memory table is refused
        (VhostRequestRefused, answered to the request that completed the setup)."""
        if self.running is not None or self.memory is None:
            return
        if not all(ring.started and ring.enabled for ring in self.rings):
            return
        if self.refused:
            if self.refused != self._start_refused_logged:
                self._start_refused_logged = dict(self.refused)
                log.warning("device not started: refused settings were not replaced",
                            refused=[request.name + ("" if index is None else f"[{index}]")
                                     for request, index in self.refused])
            return
        memory = self.memory
        features = self.features & ~(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        event = 2 if features & VIRTIO_F_EVENT_IDX else 0
        for index, ring in enumerate(self.rings):
            state = ring.queue.state
            assert ring.addresses is not None
            descriptor, available, used = ring.addresses
            try:
                state.descriptor_table = memory.guest_address_of(descriptor, 16 * state.size)
                state.available_ring = memory.guest_address_of(available,
                                                               4 + 2 * state.size + event)
                state.used_ring = memory.guest_address_of(used, 4 + 8 * state.size + event)
                state.event_idx = bool(event)
                state.indirect = bool(features & VIRTIO_F_INDIRECT_DESC)
                state.signalled_used = None
                state.next_used = memory.read_u16(state.used_ring + 2)
                ring.queue.validate(memory)
            except (DeviceNeedsReset, GuestAddressError) as e:
                raise VhostRequestRefused(f"ring {index} setup: {e}") from e
            self._recover_inflight(index, ring)
        for ring in self.rings:
            ring.queue.state.ready = True
        context = _Context(memory, self.rings, features)
        running = _RunningDevice(trio.CancelScope())
        self.running = running
        self.nursery.start_soon(self._run_device, context, running)
        log.info("device started", features=hex(features))

    def _recover_inflight(self, index: int, ring: _Ring) -> None:
        queue = ring.queue
        if not isinstance(queue, _TrackedQueue):
            return
        queue.inflight = None
        queue.resubmit = []
        if self.inflight is None or index >= self.inflight[3]:
            return
        _, view, queue_size, _ = self.inflight
        state = queue.state
        if state.size > queue_size:
            raise VhostRequestRefused(f"ring {index} has {state.size} entries, the "
                                      f"inflight area {queue_size}")
        region = inflight_queue_region_size(queue_size)
        tracker = _InflightQueue(view[index * region:(index + 1) * region], queue_size)
        heads = tracker.recover(state.next_used, state.size)
        queue.inflight = tracker
        queue.resubmit = heads
        # Chains taken so far = returned (used idx) + still in flight.
        state.next_available = (state.next_used + len(heads)) & 0xFFFF
        if heads:
            log.info("resubmitting in-flight requests", ring=index, heads=heads)

    async def _run_device(self, context: _Context, running: _RunningDevice) -> None:
        try:
            with running.scope:
                await self.device.run(context)
        except DeviceNeedsReset as e:
            log.warning("device needs reset", reason=str(e))
            for ring in self.rings:
                signal_eventfd(ring.err_fd)
        except Exception:
            log.exception("device failed")
            for ring in self.rings:
                signal_eventfd(ring.err_fd)
        finally:
            running.stopped.set()

    async def stop_device(self) -> None:
        """Stop the device without resetting it, and give back every chain it took and
        did not return (see the module docstring)."""
        running = self.running
        if running is None:
            return
        running.scope.cancel()
        with trio.move_on_after(STOP_TIMEOUT_S) as timeout:
            await running.stopped.wait()
        if timeout.cancelled_caught:
            # Still recorded as running: its queue threads may be finishing a batch,
            # and nothing they use may be released until they have (see close()).
            raise VhostProtocolError("device did not stop in time")
        self._stopped()

    def _stopped(self) -> None:
        """What follows the end of a device run: the chains it held go back, and the
        queues let go of guest RAM (see :meth:`stop_device`)."""
        self.running = None
        memory = self.memory
        for index, ring in enumerate(self.rings):
            queue = ring.queue
            if queue.state.ready and memory is not None:
                try:
                    untaken, returned = queue.give_back(memory)
                except (DeviceNeedsReset, GuestAddressError) as e:
                    # A ring the driver broke: the front-end resets the device anyway.
                    log.warning("chains held at the stop not given back", ring=index,
                                reason=str(e))
                else:
                    if returned:
                        signal_eventfd(ring.call_fd)
                    if untaken or returned:
                        log.debug("chains given back at the stop", ring=index,
                                  untaken=untaken, returned_empty=returned)
            queue.state.ready = False
            # Here, on the event loop: guest RAM may be unmapped before the next start.
            queue.forget_views()
        log.info("device stopped")

    # -- messages -----------------------------------------------------------------------

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise VhostRequestRefused(
                f"ring index {index} out of range (the device has {len(self.rings)} rings)"
            )
        return self.rings[index]

    def _setting_key(self, message: Message) -> tuple[Request, int | None] | None:
        """Which setting ``message`` changes, for the refused-settings record."""
        request = message.request
        if request not in _SETTINGS:
            return None
        payload = message.payload
        if request in (Request.SET_FEATURES, Request.SET_MEM_TABLE):
            return request, None
        index = payload & VRING_INDEX_MASK if isinstance(payload, int) else payload.index
        # A refusal for a ring that does not exist changes nothing that exists.
        return (request, index) if 0 <= index < len(self.rings) else None

    async def _reply(self, message: Message, payload: Any, fds: Sequence[int] = ()) -> None:
        await send_message(self.sock, Message(message.request, payload, reply=True), fds)

    async def handle(self, message: Message) -> None:
        request = message.request
        acked = message.need_reply and (self._reply_ack() or (
            request is Request.SET_PROTOCOL_FEATURES
            and bool(message.payload & (1 << ProtocolFeature.REPLY_ACK))))
        handler = getattr(self, f"_on_{request.name.lower()}", None)
        key = self._setting_key(message)
        try:
            if handler is None:
                raise VhostRequestRefused(f"{request.name} is not supported")
            answer = await handler(message)
        except VhostRequestRefused as refusal:
            await self._refuse(message, refusal, acked, key)
            return
        if key is not None:
            self.refused.pop(key, None)
        try:
            self.maybe_start()
        except VhostRequestRefused as refusal:
            # The request itself was taken; the rings it completed cannot start.
            await self._refuse(message, refusal, acked, None)
            return
        if isinstance(answer, _WithFds):
            try:
                await self._reply(message, answer.payload, answer.fds)
            finally:
                for fd in answer.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        elif answer is not None:
            await self._reply(message, answer)
        elif acked:
            await self._reply(message, 0)

    async def _refuse(self, message: Message, refusal: VhostRequestRefused, acked: bool,
                      key: tuple[Request, int | None] | None) -> None:
        request = message.request
        if request in REPLY_BODIES and request is not Request.GET_CONFIG:
            # The reply has a body of its own; there is no way to say "failed".
            raise VhostProtocolError(str(refusal)) from refusal
        log.warning("request refused", request=request.name, reason=str(refusal),
                    answered=acked or request is Request.GET_CONFIG
                    or request in STATUS_REPLIES)
        if key is not None:
            self.refused[key] = str(refusal)
        if request is Request.GET_CONFIG:
            await self._reply(message, None)  # vhost-user.rst: empty payload = error
        elif request is Request.SET_DEVICE_STATE_FD:
            # An error never comes with an fd of ours.
            await self._reply(message, _REFUSED | DEVICE_STATE_NO_FD)
        elif request in STATUS_REPLIES or acked:
            await self._reply(message, _REFUSED)

    async def _on_set_owner(self, message: Message) -> None:
        return None

    async def _on_reset_owner(self, message: Message) -> None:
        await self.stop_device()
        self.device.reset()
        self.features = 0
        self.refused.clear()
        self._update_logging()

    async def _on_reset_device(self, message: Message) -> None:
        await self._on_reset_owner(message)

    async def _on_get_features(self, message: Message) -> int:
        return self.offered_features

    async def _on_set_features(self, message: Message) -> None:
        features = message.payload
        if features & ~self.offered_features:
            raise VhostRequestRefused(
                f"front-end acked features 0x{features & ~self.offered_features:x} "
                "that were not offered"
            )
        if not features & VIRTIO_F_VERSION_1:
            # Only modern devices are served (virtio-net's 12-byte header, little-endian
            # rings): a legacy driver would misread them.
            raise VhostRequestRefused("features without VIRTIO_F_VERSION_1 (a legacy "
                                      "driver) are not supported")
        if self.running is not None and (features ^ self.features) & ~VHOST_F_LOG_ALL:
            # Only dirty logging may be turned on or off under a running device.
            raise VhostRequestRefused("features changed while the device is running")
        if features & VHOST_F_LOG_ALL and self.log is None:
            log.info("VHOST_F_LOG_ALL set before a log (SET_LOG_BASE): nothing is "
                     "logged until one comes")
        if (features ^ self.features) & VHOST_F_LOG_ALL and self.log is not None:
            await self._stop_for_logging_change()
        self.features = features
        self._update_logging()
        if not self._protocol_negotiated():
            # Without protocol features rings are enabled as soon as they start.
            for ring in self.rings:
                ring.enabled = True

    async def _on_get_protocol_features(self, message: Message) -> int:
        return OFFERED_PROTOCOL_FEATURES

    async def _on_set_protocol_features(self, message: Message) -> None:
        features = message.payload
        if features & ~OFFERED_PROTOCOL_FEATURES:
            raise VhostRequestRefused(
                f"front-end acked protocol features 0x{features:x} that were not offered"
            )
        self.protocol_features = features

    async def _on_get_queue_num(self, message: Message) -> int:
        return len(self.rings)

    async def _on_get_config(self, message: Message) -> dict[str, Any]:
        config = message.payload
        if config.offset + config.size > MAX_CONFIG_SIZE:
            raise VhostRequestRefused(
                f"config read at {config.offset}+{config.size} past {MAX_CONFIG_SIZE} bytes"
            )
        data = self.device.read_config(config.offset, config.size)
        return {"offset": config.offset, "size": config.size, "flags": config.flags,
                "payload": data}

    async def _on_set_config(self, message: Message) -> None:
        config = message.payload
        if config.offset + config.size > MAX_CONFIG_SIZE:
            raise VhostRequestRefused(
                f"config write at {config.offset}+{config.size} past {MAX_CONFIG_SIZE} bytes"
            )
        self.device.write_config(config.offset, config.payload)

    async def _on_set_mem_table(self, message: Message) -> None:
        table = message.payload
        if len(message.fds) != table.nregions:
            raise VhostRequestRefused(
                f"memory table of {table.nregions} regions came with {len(message.fds)} fds"
            )
        memory = VhostMemory(table.regions, message.fds,
                             allow_unsealed=self.allow_unsealed_memory)
        was_running = self.running is not None
        try:
            await self.stop_device()
        except BaseException:
            memory.close()
            raise
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        log.info("memory table", regions=[(hex(r.guest_address), r.size)
                                           for r in table.regions])
        if was_running:
            log.info("memory table replaced while running; restarting the device")

    async def _on_set_vring_num(self, message: Message) -> None:
        ring = self._ring(message.payload.index)
        size = message.payload.num
        maximum = ring.queue.state.max_size
        if not 0 < size <= maximum or size & (size - 1):
            raise VhostRequestRefused(f"ring size {size} is not a power of two up to "
                                      f"{maximum}")
        self._check_stopped(ring, "SET_VRING_NUM")
        ring.queue.state.size = size

    async def _on_set_vring_addr(self, message: Message) -> None:
        address = message.payload
        ring = self._ring(address.index)
        if address.flags & ~VHOST_VRING_F_LOG:
            raise VhostRequestRefused(f"SET_VRING_ADDR with unknown flags "
                                      f"0x{address.flags:x}")
        addresses = (address.descriptor, address.available, address.used)
        if ring.addresses != addresses:
            # On a running ring only the logging may change (QEMU turns it on and off
            # while rings run).
            self._check_stopped(ring, "SET_VRING_ADDR")
        log_address = address.log if address.flags & VHOST_VRING_F_LOG else None
        if log_address != ring.log_address and self._logging():
            await self._stop_for_logging_change()
        ring.addresses = addresses
        ring.log_address = log_address
        self._update_logging()

    async def _on_set_log_base(self, message: Message) -> int:
        """Take the front-end's dirty log (LOG_SHMFD); answered either way (0: taken,
        1: refused, the previous log stays), as the front-end waits for an answer."""
        if not self.protocol_features & (1 << ProtocolFeature.LOG_SHMFD):
            raise VhostRequestRefused("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD "
                                      "(a log in the back-end's own memory is not supported)")
        area = message.payload
        try:
            if len(message.fds) != 1:
                raise VhostRequestRefused(f"SET_LOG_BASE with {len(message.fds)} fds")
            if not 0 < area.mmap_size <= MAX_LOG_SIZE or area.mmap_offset > 1 << 62:
                raise VhostRequestRefused(f"a dirty log of {area.mmap_size} bytes at "
                                          f"offset {area.mmap_offset}")
            check_shared_fd(message.fds[0], area.mmap_offset + area.mmap_size,
                            allow_unsealed=self.allow_unsealed_memory, what="dirty log")
            try:
                new = BackendLog(message.fds[0], area.mmap_size, area.mmap_offset)
            except (OSError, ValueError, OverflowError) as e:
                raise VhostRequestRefused(f"cannot map the dirty log: {e}") from e
        except VhostRequestRefused as refusal:
            log.warning("request refused", request="SET_LOG_BASE", reason=str(refusal),
                        answered=True)
            return _REFUSED
        if self.features & VHOST_F_LOG_ALL:
            # The queues mark the old log (or none): not across the swap.
            try:
                await self._stop_for_logging_change()
            except BaseException:
                new.close()
                raise
        old, self.log = self.log, new
        self._update_logging()
        if old is not None:
            old.close()
        log.info("dirty log set", size=area.mmap_size)
        return 0

    def _logging(self) -> bool:
        """Whether the queues log now (VHOST_F_LOG_ALL on and a log set)."""
        return self.log is not None and bool(self.features & VHOST_F_LOG_ALL)

    async def _stop_for_logging_change(self) -> None:
        """Stop a running device before its dirty logging changes (handle() starts it
        again after the request): its queues may be served by threads of their own, and
        a C loop that takes chains only while nothing is logged, or a thread marking a
        log that is being unmapped, must not run across the change. After the answer,
        every page the device writes is logged (QEMU waits for the answer to the
        SET_FEATURES that turns logging on for that). The driver sees nothing of it:
        chains held are given back and taken again."""
        if self.running is not None:
            log.info("device restarted for a change of dirty logging")
            await self.stop_device()

    async def _on_set_vring_base(self, message: Message) -> None:
        ring = self._ring(message.payload.index)
        base = message.payload.num
        if base > 0xFFFF:
            raise VhostRequestRefused(f"ring base {base} is not a u16")
        self._check_stopped(ring, "SET_VRING_BASE")
        ring.queue.state.next_available = base
        ring.queue.state.next_used = base

    async def _on_get_vring_base(self, message: Message) -> dict[str, int]:
        ring = self._ring(message.payload.index)
        await self.stop_device()
        _close_attr(ring, "kick_fd")
        if self._protocol_negotiated():
            ring.enabled = False
        # After the stop: every chain the device held was given back.
        return {"index": message.payload.index, "num": ring.queue.state.next_available}

    def _check_stopped(self, ring: _Ring, what: str) -> None:
        if self.running is not None and ring.started:
            raise VhostRequestRefused(f"{what} on a running ring")

    def _vring_fd(self, message: Message, what: str) -> tuple[_Ring, int]:
        """The ring and the eventfd of a SET_VRING_KICK/CALL/ERR (-1: the no-fd bit).
        The fd is taken out of the message (the caller owns it); anything but one
        eventfd, or none with the no-fd bit, is refused."""
        value = message.payload
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise VhostRequestRefused(f"{what}: unknown bits in 0x{value:x}")
        ring = self._ring(value & VRING_INDEX_MASK)
        if value & VRING_NOFD:
            if message.fds:
                raise VhostRequestRefused(f"{what}: fd sent with the no-fd bit set")
            return ring, -1
        if len(message.fds) != 1:
            raise VhostRequestRefused(f"{what}: expected one fd, got {len(message.fds)}")
        fd = message.fds[0]
        kind = _fd_kind(fd)
        if kind != EVENTFD_LINK:
            raise VhostRequestRefused(f"{what}: the fd is not an eventfd ({kind})")
        try:
            os.set_blocking(fd, False)
        except OSError as e:
            raise VhostRequestRefused(f"{what}: unusable fd: {e}") from e
        message.fds.pop()
        return ring, fd

    async def _on_set_vring_kick(self, message: Message) -> None:
        ring, fd = self._vring_fd(message, "SET_VRING_KICK")
        if fd < 0:
            raise VhostRequestRefused("SET_VRING_KICK without an fd (polling) is not "
                                      "supported")
        try:
            await self.stop_device()
        except BaseException:
            os.close(fd)
            raise
        _close_attr(ring, "kick_fd")
        ring.kick_fd = fd
        if not self._protocol_negotiated():
            ring.enabled = True

    async def _on_set_vring_call(self, message: Message) -> None:
        ring, fd = self._vring_fd(message, "SET_VRING_CALL")
        if fd >= 0 and ring.call_fd >= 0:
            # Under a running device whose queue thread may be writing the old fd (QEMU
            # swaps it when the guest masks a vector): the old number is made to refer
            # to the new eventfd in one step (dup3), so no write ever lands on a closed
            # or reused fd number.
            try:
                os.dup2(fd, ring.call_fd, inheritable=False)
            finally:
                os.close(fd)
            fd = ring.call_fd
        elif fd != ring.call_fd:
            if self.running is not None:
                # An fd number that appears or goes away: not under a queue thread
                # (whose syscall filter allows the numbers it started with).
                try:
                    await self.stop_device()
                except BaseException:
                    if fd >= 0:
                        os.close(fd)
                    raise
            _close_attr(ring, "call_fd")
            ring.call_fd = fd
        # The ring may have started (and completed chains) before this fd existed:
        # without protocol features rings start at SET_VRING_KICK, which QEMU sends
        # first. One spurious interrupt is harmless; a lost one hangs the driver.
        signal_eventfd(fd)

    async def _on_set_vring_err(self, message: Message) -> None:
        ring, fd = self._vring_fd(message, "SET_VRING_ERR")
        _close_attr(ring, "err_fd")
        ring.err_fd = fd

    async def _on_set_vring_enable(self, message: Message) -> None:
        ring = self._ring(message.payload.index)
        enable = message.payload.num
        if enable not in (0, 1):
            raise VhostRequestRefused(f"SET_VRING_ENABLE with {enable}")
        if not enable:
            await self.stop_device()
        ring.enabled = bool(enable)

    async def _on_set_vring_endian(self, message: Message) -> None:
        if message.payload.num != 0:  # 0: little-endian, the only order of modern virtio
            raise VhostRequestRefused("big-endian rings are not supported")

    async def _on_get_max_mem_slots(self, message: Message) -> int:
        return 8

    async def _on_get_inflight_fd(self, message: Message) -> _WithFds:
        request = message.payload
        if not 0 < request.num_queues <= len(self.rings):
            raise VhostRequestRefused(f"GET_INFLIGHT_FD for {request.num_queues} queues "
                                      f"(the device has {len(self.rings)})")
        if not 0 < request.queue_size <= 32768:
            raise VhostRequestRefused(f"GET_INFLIGHT_FD for queues of {request.queue_size}")
        size = request.num_queues * inflight_queue_region_size(request.queue_size)
        fd = os.memfd_create("avmm-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)  # zero-filled: nothing in flight
            # Sealed as guest RAM must be: it comes back with SET_INFLIGHT_FD, also to a
            # restarted back-end, which maps it only if it cannot shrink.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _INFLIGHT_SEALS)
        except OSError:
            os.close(fd)
            raise
        log.info("inflight area created", size=size, queues=request.num_queues,
                 queue_size=request.queue_size)
        return _WithFds({"mmap_size": size, "mmap_offset": 0,
                         "num_queues": request.num_queues,
                         "queue_size": request.queue_size}, [fd])

    async def _on_set_inflight_fd(self, message: Message) -> None:
        area = message.payload
        if len(message.fds) != 1:
            raise VhostRequestRefused(f"SET_INFLIGHT_FD with {len(message.fds)} fds")
        if not 0 < area.num_queues <= len(self.rings) or not 0 < area.queue_size <= 32768:
            raise VhostRequestRefused(f"SET_INFLIGHT_FD for {area.num_queues} queues of "
                                      f"{area.queue_size}")
        needed = area.num_queues * inflight_queue_region_size(area.queue_size)
        if area.mmap_size < needed:
            raise VhostRequestRefused(f"inflight area of {area.mmap_size} bytes, "
                                      f"{needed} needed")
        check_shared_fd(message.fds[0], area.mmap_offset + needed,
                        allow_unsealed=self.allow_unsealed_memory, what="inflight area")
        aligned = area.mmap_offset - area.mmap_offset % mmap.ALLOCATIONGRANULARITY
        delta = area.mmap_offset - aligned
        try:
            mapping = mmap.mmap(message.fds[0], needed + delta, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        except (OSError, ValueError, OverflowError) as e:
            raise VhostRequestRefused(f"cannot map the inflight area: {e}") from e
        # Mapped before the stop: a refusal leaves a running device running.
        try:
            await self.stop_device()
        except BaseException:
            mapping.close()
            raise
        self._forget_inflight()
        self.inflight = (mapping, memoryview(mapping)[delta:delta + needed],
                         area.queue_size, area.num_queues)

    # -- device state (DEVICE_STATE) ----------------------------------------------------

    async def _on_set_device_state_fd(self, message: Message) -> int:
        """Start a transfer of the device's state through the fd sent (see the module
        docstring); answered at once, the bytes flow in a task of their own."""
        params = message.payload
        if params.direction not in (DEVICE_STATE_SAVE, DEVICE_STATE_LOAD):
            raise VhostRequestRefused(f"unknown device state transfer direction "
                                      f"{params.direction}")
        if params.phase != DEVICE_STATE_PHASE_STOPPED:
            raise VhostRequestRefused(f"unknown migration phase {params.phase} (only "
                                      "0, the device stopped, is supported)")
        if len(message.fds) != 1:
            raise VhostRequestRefused(f"SET_DEVICE_STATE_FD with {len(message.fds)} fds")
        try:
            mode = os.fstat(message.fds[0]).st_mode
        except OSError as e:
            raise VhostRequestRefused(f"SET_DEVICE_STATE_FD: unusable fd: {e}") from e
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise VhostRequestRefused("SET_DEVICE_STATE_FD: the fd is not a pipe or a "
                                      "socket")
        if self.running is not None:
            raise VhostRequestRefused("device state transfer while the rings run (stop "
                                      "them with GET_VRING_BASE first)")
        self._abort_transfer()
        data = b""
        if params.direction == DEVICE_STATE_SAVE:
            try:
                # Neither feature is the device's (nor the driver's): the state holds
                # what the driver negotiated.
                data = save_backend_state(self.device, self.features & ~(
                    VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL))
            except (DeviceStateError, TypeError, ValueError) as e:
                # The device cannot be saved now, or its state does not fit its
                # declaration (a bug): the front-end gets a failure, not a hang-up.
                raise VhostRequestRefused(f"cannot save the device state: {e}") from e
        fd = message.fds.pop()
        transfer = _Transfer(params.direction)
        self.transfer = transfer
        self.nursery.start_soon(self._transfer, transfer, fd, data)
        log.info("device state transfer started",
                 direction="save" if params.direction == DEVICE_STATE_SAVE else "load")
        return DEVICE_STATE_NO_FD  # success, and we use the front-end's channel

    async def _transfer(self, transfer: _Transfer, fd: int, data: bytes) -> None:
        """Write ``data`` (save) or read the state up to end-of-file and apply it
        (load), within :data:`TRANSFER_TIMEOUT_S`; the outcome goes to ``transfer``."""
        stream = trio.lowlevel.FdStream(fd)
        try:
            with transfer.scope:
                with trio.move_on_after(TRANSFER_TIMEOUT_S) as timeout:
                    if transfer.direction == DEVICE_STATE_SAVE:
                        await stream.send_all(data)
                        transfer.size = len(data)
                    else:
                        data = await self._read_state(stream, transfer)
                if timeout.cancelled_caught:
                    transfer.error = (f"the front-end did not finish the transfer within "
                                      f"{TRANSFER_TIMEOUT_S:g} s")
                if transfer.scope.cancelled_caught and transfer.error is None:
                    transfer.error = "aborted by a new transfer or the front-end leaving"
            if transfer.error is None and transfer.direction == DEVICE_STATE_LOAD:
                self._apply_state(transfer, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            transfer.error = f"the transfer channel failed: {e}"
        finally:
            with contextlib.suppress(OSError):
                stream.close()
            transfer.done.set()

    @staticmethod
    async def _read_state(stream: Any, transfer: _Transfer) -> bytes:
        chunks: list[bytes] = []
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return b"".join(chunks)
            transfer.size += len(chunk)
            if transfer.size > MAX_DEVICE_STATE_SIZE:
                transfer.error = (f"the front-end sent more than {MAX_DEVICE_STATE_SIZE} "
                                  "bytes of device state")
                return b""
            chunks.append(chunk)

    def _apply_state(self, transfer: _Transfer, data: bytes) -> None:
        if self.running is not None:
            transfer.error = "the rings were started before the state was loaded"
            return
        try:
            load_backend_state(self.device, data, self.offered_features)
        except DeviceStateError as e:
            transfer.error = str(e)
        except Exception as e:
            # A device's restore_state that fails otherwise is a bug in it: the
            # front-end gets a failure and the connection stays.
            log.exception("device failed to load its state")
            transfer.error = f"internal error: {type(e).__name__}: {e}"

    async def _on_check_device_state(self, message: Message) -> int:
        """0 once the last transfer completed (and, loading, the state was applied);
        1 otherwise, with the reason logged."""
        transfer = self.transfer
        if transfer is None:
            log.warning("device state check without a transfer")
            return _REFUSED
        with trio.move_on_after(TRANSFER_TIMEOUT_S):
            await transfer.done.wait()
        if not transfer.done.is_set():
            self._abort_transfer()
            transfer.error = "the transfer did not finish in time"
        self.transfer = None
        direction = "save" if transfer.direction == DEVICE_STATE_SAVE else "load"
        if transfer.error is not None:
            log.warning("device state transfer failed", direction=direction,
                        reason=transfer.error)
            return _REFUSED
        log.info("device state transferred", direction=direction, size=transfer.size)
        return 0

    def _abort_transfer(self) -> None:
        transfer = self.transfer
        if transfer is not None and not transfer.done.is_set():
            transfer.scope.cancel()


def _fd_kind(fd: int) -> str:
    """What ``fd`` is, as /proc/self/fd names it ("anon_inode:[eventfd]", "pipe:[...]",
    a path); where /proc is not mounted, from fstat (an eventfd is an anonymous inode
    with no file type bits; other anonymous inodes are refused later, by use)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"unusable: {e}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        return f"unusable: {e}"
    return EVENTFD_LINK if stat.S_IFMT(mode) == 0 else f"file type 0o{stat.S_IFMT(mode):o}"


def _peer(conn: Any) -> dict[str, int]:
    """The connecting process (SO_PEERCRED): pid, uid, gid, for the logs."""
    try:
        data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", data)
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


# -- the listener ----------------------------------------------------------------------


def _remove_stale_socket(path: str) -> None:
    """Make ``path`` free: remove a socket nobody listens on (a back-end that died);
    refuse a live one (another back-end serving there would lose its front-ends) and
    any other file. Blocking (the probe)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise VhostBackendError(f"{path} exists and is not a socket; not replacing it")
    try:
        listens = server_listens(path)
    except OSError as e:
        raise VhostBackendError(f"cannot tell whether a server listens on {path}: "
                                f"{e.strerror or e}") from e
    if listens:
        raise VhostBackendError(f"another program is listening on {path}; stop it or "
                                "choose another --socket")
    log.info("replacing a stale socket", socket=path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _bind(path: str) -> tuple[Any, tuple[int, int]]:
    """A listening socket at ``path``, mode 0600 from the moment it appears there."""
    await trio.to_thread.run_sync(_remove_stale_socket, path)
    temporary = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await listener.bind(temporary)
        os.chmod(temporary, 0o600)
        listener.listen(1)
        os.rename(temporary, path)
        info = os.stat(path)
    except OSError as e:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise VhostBackendError(f"cannot listen on {path}: {e}") from e
    return listener, (info.st_dev, info.st_ino)


async def serve_device(device: VirtioDevice, socket_path: str, *,
                       allow_unsealed_memory: bool = False,
                       task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``device`` over vhost-user at ``socket_path`` until cancelled, one front-end
    connection at a time (see the module docstring). Reports the path through
    ``task_status`` once it is listening; removes the socket file on exit.
    ``allow_unsealed_memory`` maps guest RAM that is not sealed against shrinking (a
    front-end that shrinks it then kills this process with SIGBUS)."""
    socket_path = os.fspath(socket_path)
    listener, identity = await _bind(socket_path)
    bound_log = log.bind(device=device.name, socket=socket_path)
    try:
        with listener:
            task_status.started(socket_path)
            bound_log.info("vhost-user back-end listening",
                           allow_unsealed_memory=allow_unsealed_memory)
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        bound_log.warning("accept failed", error=str(e))
                        await trio.sleep(0.1)
                        continue
                    raise
                with conn:
                    await _serve_connection(device, conn,
                                            allow_unsealed_memory=allow_unsealed_memory)
    finally:
        with contextlib.suppress(OSError):
            info = os.stat(socket_path)
            if (info.st_dev, info.st_ino) == identity:
                os.unlink(socket_path)


async def _serve_connection(device: VirtioDevice, conn: Any, *,
                            allow_unsealed_memory: bool = False) -> None:
    structlog.contextvars.bind_contextvars(device=device.name, **_peer(conn))
    log.info("front-end connected")
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(device, conn, nursery,
                               allow_unsealed_memory=allow_unsealed_memory)
            try:
                await session.serve()
            finally:
                await session.close()
    except* VhostProtocolError as group:
        for error in group.exceptions:
            log.warning("front-end dropped", reason=str(error))
    except* OSError as group:
        for error in group.exceptions:
            log.warning("front-end connection failed", error=str(error))
    except* Exception as group:
        for error in group.exceptions:
            log.error("front-end dropped after an internal error",
                      error=f"{type(error).__name__}: {error}", exc_info=error)
    finally:
        structlog.contextvars.unbind_contextvars("peer_pid", "peer_uid", "peer_gid")
