"""virtio-net (virtio 1.2 §5.1) on a host tap device.

One receive queue (0) and one transmit queue (1). Offered: VIRTIO_NET_F_MAC (the MAC in
the config space), VIRTIO_NET_F_MRG_RXBUF (a received frame may be spread over several
receive buffers) and VIRTIO_NET_F_STATUS (the link is always up). No checksum or
segmentation offloads yet, so every frame in either direction is a complete, fully
checksummed Ethernet frame of at most :data:`MAX_FRAME_SIZE` bytes.

Every frame travels behind a 12-byte ``struct virtio_net_hdr`` (VERSION_1 always has
``num_buffers``). The tap is opened with the same header size, so guest buffers and the
tap exchange header + frame in one ``readv``/``writev`` without reformatting:

* Transmit: the device gathers the frame straight out of guest memory into one
  ``writev``. With no offloads negotiated the driver must send a zero header; the device
  sends a zero header of its own rather than trusting the guest's, so a driver that sets
  NEEDS_CSUM or a GSO type anyway cannot make the host kernel act on them.
* Receive: the device reads the tap straight into the first receive buffer (and a
  bounce buffer for what does not fit), then overwrites the kernel's header with flags 0,
  GSO_NONE and ``num_buffers``. A frame that does not fit one buffer is spread over more
  with MRG_RXBUF, and dropped (counted in ``stats.rx_dropped``) without it.

Batches: each wake-up of a queue's loop handles up to a ring's worth of transmit chains
(``_RX_BATCH`` frames on receive) and signals the driver once for all of them. The usual
layouts (a transmit chain of device-readable descriptors, no indirect table; a receive
chain of one buffer) go through C (:mod:`avmm.virtio.net_fast`): one call per batch,
outside the GIL, walks the ring, moves each frame with one ``readv``/``writev`` and fills
the used ring. It stops before anything else (another layout, a frame of a size to drop,
a frame larger than its buffer, a tap error), and the Python code here, which knows every
rule, takes the ring from there; without the compiled module (or with
``AVMM_NET_PYTHON=1``) the Python code does everything, with a short path of its own for
the usual layouts. Either way the guest sees the same rings (tests/virtio/test_fuzz_net.py
compares them). The receive side reads the tap before waiting for it, so a busy tap costs
no poll round trip per batch. The tap still costs one ``writev`` or ``readv`` per frame:
a tap fd has no multi-frame read or write.

Where the loops run: where the transport hands over its kick eventfds (the in-process
virtio-mmio slot, the vhost-user back-end) each queue has an I/O thread of its own that
sleeps in poll(2) on the kick eventfd, the tap and a stop eventfd, as blk's does, and
signals the driver from there; a frame costs no trio wake-up. Elsewhere (a test's
context) both are trio tasks. The loops are written once, as generators that yield what
they wait for (:meth:`NetDevice.run`).

Back-pressure: the device reads the tap only while it holds a receive buffer. Without
buffers it waits for the driver's kick, and frames wait in the tap's kernel queue
(bounded by its txqueuelen; the kernel drops beyond that), never in Python memory: the
device holds at most one frame (in its one bounce buffer).

Rate limits (:mod:`avmm.ratelimit`), one limiter per direction (:attr:`NetDevice.tx_throttle`,
:attr:`NetDevice.rx_throttle`; None, the default, is unlimited and the loops above run
as they are). A frame costs one op and its Ethernet bytes (no virtio header). Transmit:
each chain is admitted before it is sent; a refused one stays held (taken, not
returned) while the task sleeps, and goes first when admitted. Receive: the size of a
frame is known only once it is read, so the tap is read only while both buckets have
something left (an op, and a bandwidth level above zero), and the frame's bytes are
charged after the read: the bandwidth bucket may go into debt by up to one frame, which
the frames after it wait off. Meanwhile frames wait in the tap's kernel queue, as they
do without receive buffers. Limited frames take the general per-frame path.

Protocol violations (:class:`DeviceNeedsReset`): a transmit chain with device-writable
buffers, a receive chain with device-readable buffers, and with MRG_RXBUF a receive
buffer smaller than the header (§5.1.6.3.1). Frames the device will not send (shorter
than an Ethernet header or longer than :data:`MAX_FRAME_SIZE`) and frames the tap
refuses are dropped and counted: the driver gets its buffer back either way.
"""

from __future__ import annotations

import enum
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar, Protocol

import structlog
import trio

from ..devices._state import DeviceStateError, check_bytes, check_state_class
from ..isolation.syscalls import ThreadKind
from ..ratelimit import limiter_wait_s
from ..tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TapError
from ..threads import run_in_own_thread
from . import net_fast
from .device import (
    DeviceContext,
    DeviceId,
    DeviceNeedsReset,
    VirtioDevice,
    offered_queue_size,
    run_together,
)

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from ..ratelimit import Throttle
    from .net_fast import FastBatch, NetFastPath
    from .queue import DescriptorChain, VirtQueue

log = structlog.get_logger(__name__)

__all__ = [
    "LARGEST_QUEUE_SIZE",
    "MAX_FRAME_SIZE",
    "NET_HEADER_SIZE",
    "OFFLOAD_FEATURES",
    "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6",
    "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_HOST_TSO6",
    "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_MRG_RXBUF",
    "VIRTIO_NET_F_STATUS",
    "VIRTIO_NET_S_LINK_UP",
    "NetDevice",
    "NetStats",
    "TapLike",
    "offloads_of",
    "transmit_header",
]

#: Feature bits (virtio 1.2 §5.1.3).
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
#: ``status`` bit in the config space.
VIRTIO_NET_S_LINK_UP = 1
#: The offloads offered (see the module docstring, "Offloads").
OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
                    | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_HOST_TSO4
                    | VIRTIO_NET_F_HOST_TSO6)
#: ``struct virtio_net_hdr`` flags and gso_type values (§5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
#: What the driver may ask of the host on transmit (TxOffload bits, C's too).
TX_CSUM, TX_TSO4, TX_TSO6 = 1, 2, 4

RX_QUEUE = 0
TX_QUEUE = 1
#: The ring size offered by default (QueueNumMax in-process).
QUEUE_SIZE = 256
#: The largest rings the device serves: what a vhost-user front-end may choose (QEMU's
#: virtio-net ``rx_queue_size``/``tx_queue_size`` go up to 1024); see ``queue_size``.
LARGEST_QUEUE_SIZE = 1024

#: ``struct virtio_net_hdr`` with ``num_buffers`` (no hash report): flags, gso_type,
#: hdr_len, gso_size, csum_start, csum_offset, num_buffers.
NET_HEADER = struct.Struct("<BBHHHHH")
NET_HEADER_SIZE = NET_HEADER.size
_ZERO_HEADER = bytes(NET_HEADER_SIZE)
#: The header of a received frame that fits one buffer: flags 0, GSO_NONE, num_buffers 1.
_ONE_BUFFER_HEADER = NET_HEADER.pack(0, 0, 0, 0, 0, 0, 1)
#: Where num_buffers is in the header: all the device writes of a received frame's
#: header when the driver takes offloads (the rest is the kernel's).
_NUM_BUFFERS = 10
_NUM_BUFFERS_FIELD = struct.Struct("<H")
_ONE_BUFFER = _NUM_BUFFERS_FIELD.pack(1)
#: The largest frame (Ethernet header included, virtio header not) the device passes in
#: either direction: a 64 KiB IP packet behind an Ethernet header, with some slack.
MAX_FRAME_SIZE = 65550
#: Shorter than an Ethernet header is not a frame (the tap refuses it anyway).
MIN_FRAME_SIZE = 14
#: The shortest read from the tap that is a frame to pass on: header + Ethernet header.
_SMALLEST_RECEIVED = NET_HEADER_SIZE + MIN_FRAME_SIZE
#: ``struct virtio_net_config`` up to max_virtqueue_pairs: mac[6], status, pairs.
_CONFIG = struct.Struct("<6sHH")
#: Linux's UIO_MAXIOV: more buffers than this in one chain go through a copy.
_IOV_MAX = 1024
#: Frames received per batch before the used ring is signalled and other tasks run.
_RX_BATCH = 64


class _Wait(enum.Enum):
    """What a queue's loop waits for (see :meth:`NetDevice.run`)."""

    KICK = "kick"            #: the driver's notification on queue ``argument``
    READABLE = "readable"    #: fd ``argument`` readable
    WRITABLE = "writable"    #: fd ``argument`` writable
    SLEEP = "sleep"          #: ``argument`` seconds (a rate limiter's wait)
    YIELD = "yield"          #: nothing: let the rest of the loop's thread or tasks run


_Step = tuple[_Wait, float]
_Steps = Callable[["DeviceContext"], Iterator[_Step]]
#: Why a receive batch of the C loop ended, for the loop's next wait.
_TAP_EMPTY, _NO_BUFFERS, _MORE = range(3)


def _poll_one(poller: select.poll, fd: int, events: int) -> None:
    """Sleep until ``fd`` has ``events`` or the poller's other fds (a stop) are ready."""
    poller.register(fd, events)
    try:
        poller.poll()  # releases the GIL; EINTR is retried by Python
    finally:
        poller.unregister(fd)


def offloads_of(features: int) -> tuple[int, int]:
    """What negotiated ``features`` allow: the transmit offloads the driver may ask for
    (TX_* bits) and the tap's TUN_F_* flags for receive. An offload counts only with
    the feature the spec makes it depend on (§5.1.3.1: HOST_TSO* needs CSUM, GUEST_TSO*
    needs GUEST_CSUM), so a driver that negotiates one without the other gets neither."""
    tx = 0
    if features & VIRTIO_NET_F_CSUM:
        tx = TX_CSUM
        if features & VIRTIO_NET_F_HOST_TSO4:
            tx |= TX_TSO4
        if features & VIRTIO_NET_F_HOST_TSO6:
            tx |= TX_TSO6
    tun = 0
    if features & VIRTIO_NET_F_GUEST_CSUM:
        tun = TUN_F_CSUM
        if features & VIRTIO_NET_F_GUEST_TSO4:
            tun |= TUN_F_TSO4
        if features & VIRTIO_NET_F_GUEST_TSO6:
            tun |= TUN_F_TSO6
    return tx, tun


def transmit_header(guest_header: bytes | memoryview, offloads: int) -> bytes | None:
    """The header to put in front of a transmitted frame, from the driver's: with no
    transmit offload negotiated, zeros (the guest's header is not passed on); otherwise
    its checksum request (NEEDS_CSUM, csum_start, csum_offset) and, for a negotiated
    GSO type, its segmentation (gso_type, hdr_len, gso_size), everything else zero.
    None: the frame asks for a segmentation never negotiated (ECN included) and is
    dropped. The host kernel checks the values themselves, as it does vhost-net's."""
    if not offloads:
        return _ZERO_HEADER
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = NET_HEADER.unpack(
        guest_header)
    flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM
    if not flags:
        csum_start = csum_offset = 0
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        hdr_len = gso_size = 0
    elif not ((gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and offloads & TX_TSO4)
              or (gso_type == VIRTIO_NET_HDR_GSO_TCPV6 and offloads & TX_TSO6)):
        return None
    return NET_HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


class TapLike(Protocol):
    """What the device needs of a tap: a non-blocking fd on which each read returns one
    frame and each write sends one, behind a 12-byte virtio-net header
    (:class:`avmm.tap.Tap`; in tests, a datagram socket works too)."""

    fd: int
    name: str


@dataclass
class NetStats:
    """Counters since the device was made (not reset with the device)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    #: Frames read from the tap that the guest never saw (no room, too big).
    rx_dropped: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    #: Frames the guest sent that never reached the tap (bad size, tap refused).
    tx_dropped: int = 0


@dataclass(frozen=True)
class NetState:
    """A virtio-net device's own state in a snapshot. The receive buffers the device
    held were given back to the driver when it was paused (the queue positions say
    where the device is), and a frame half-placed into them was dropped (counted in
    ``rx_dropped``), as a NIC drops a frame it cannot deliver. The link is always up.
    The MAC is recorded so that a restore onto a device with another MAC (which the
    guest would not notice until it read its config again) is refused."""

    STATE_VERSION: ClassVar[int] = 1

    mac: bytes


class NetDevice(VirtioDevice):
    """A virtio-net NIC whose wire is ``tap`` (see the module docstring).

    The device does not own the tap: whoever opened it closes it, after ``run`` ended.
    ``mac`` is the 6-byte unicast address the guest finds in the config space.
    ``queue_size`` is both rings' maximum: a driver behind virtio-mmio takes it as its
    ring size, a vhost-user front-end chooses its own up to it.
    """

    device_id = DeviceId.NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: TapLike, *, mac: bytes, name: str = "net0",
                 queue_size: int = QUEUE_SIZE) -> None:
        offered_queue_size(queue_size, LARGEST_QUEUE_SIZE)
        self.queue_max_sizes = (queue_size, queue_size)
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")
        if mac[0] & 1:
            raise ValueError(f"MAC {mac.hex(':')} is a multicast address")
        self.tap = tap
        self.mac = mac
        self.name = name
        self.stats = NetStats()
        self._log = log.bind(device=name)
        # Receive state: chains taken from the receive queue and not yet returned (the
        # first receives the next frame), and a frame read from the tap that waits for
        # more buffers (MRG_RXBUF). Its first bytes are in the first chain, the rest in
        # self._rx_buffer[_rx_overflow_start:_rx_overflow_end].
        self._rx_chains: list[DescriptorChain] = []
        self._rx_frame_length = 0
        self._rx_first_length = 0
        self._rx_overflow_start = 0
        self._rx_overflow_end = 0
        # One byte more than the largest frame, so an oversized one is seen as such.
        self._rx_buffer = bytearray(NET_HEADER_SIZE + MAX_FRAME_SIZE + 1)
        #: Rate limiters' handles (avmm.ratelimit.Throttle) per direction; None:
        #: unlimited. Read once per batch, so they may be replaced at any time.
        self.tx_throttle: Throttle | None = None
        self.rx_throttle: Throttle | None = None
        # A transmit chain the TX limiter refused (taken, not returned), and the wait.
        self._tx_held: DescriptorChain | None = None
        self._tx_wait_ns = 0
        # What the negotiated features allow (offloads_of), set when run() starts.
        self._tx_offloads = 0
        self._rx_header_kept = False
        # The C loops (None: not built, or AVMM_NET_PYTHON=1), one per queue.
        self._fast_rx = net_fast.fast_path(self._rx_buffer)
        self._fast_tx = net_fast.fast_path(None)

    # -- VirtioDevice -------------------------------------------------------------------

    def device_features(self) -> int:
        return (VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
                | OFFLOAD_FEATURES)

    def config_space(self) -> bytes:
        """``struct virtio_net_config``: mac, status (link up), max_virtqueue_pairs 1."""
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    def read_config(self, offset: int, size: int) -> bytes:
        config = self.config_space()
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        return config[offset:offset + size].ljust(size, b"\0")

    def reset(self) -> None:
        # No tap ioctl here: a reset may complete on a vCPU thread, whose filter allows
        # KVM's ioctls only; the next run() tells the tap what the next driver takes.
        self._release_chains()
        self._tx_offloads = 0
        self._rx_header_kept = False

    def _set_tap_offload(self, flags: int) -> None:
        """Tell the tap which offloaded frames the driver takes (a tap that cannot be
        told, a test's socket, has none)."""
        set_offload = getattr(self.tap, "set_offload", None)
        if set_offload is not None and getattr(self.tap, "offload", None) != flags:
            set_offload(flags)

    # -- snapshots ----------------------------------------------------------------------

    state_class = NetState

    def save_state(self) -> NetState:
        return NetState(mac=self.mac)

    def restore_state(self, state: NetState) -> None:
        check_state_class(state, NetState, self.name)
        check_bytes(self.name, "mac", state.mac, 6)
        if state.mac != self.mac:
            raise DeviceStateError(
                f"{self.name} state: the guest's MAC is {state.mac.hex(':')}, this device's "
                f"{self.mac.hex(':')} (restore with the same network config)")
        self._release_chains()

    async def run(self, context: DeviceContext) -> None:
        """Serve the receive and transmit queues until cancelled. Returns holding no
        chain (see :meth:`VirtioDevice.run`): receive buffers taken and a transmit
        chain waiting for the tap go back to the driver through the queue.

        With ``context.kick_fd`` (the in-process slot, the vhost-user back-end) each
        queue gets an I/O thread of its own that sleeps in poll(2) on its kick eventfd
        and the tap, as blk's does (see the module docstring); otherwise both are trio
        tasks."""
        kick_fd = getattr(context, "kick_fd", None)
        call_fd = getattr(context, "call_fd", None)
        self._tx_offloads, tun_flags = offloads_of(context.features)
        self._rx_header_kept = bool(tun_flags)
        self._set_tap_offload(tun_flags)
        try:
            with structlog.contextvars.bound_contextvars(device=self.name):
                if callable(kick_fd):
                    await run_together(
                        partial(self._serve_in_thread, context, RX_QUEUE,
                                self._receive_steps, kick_fd, call_fd),
                        partial(self._serve_in_thread, context, TX_QUEUE,
                                self._transmit_steps, kick_fd, call_fd),
                    )
                else:
                    await run_together(
                        partial(self._serve_in_trio, context, self._receive_steps),
                        partial(self._serve_in_trio, context, self._transmit_steps),
                    )
        finally:
            self._release_chains()
            for fast in (self._fast_rx, self._fast_tx):
                if fast is not None:
                    fast.forget()

    @staticmethod
    async def _serve_in_trio(context: DeviceContext, steps: _Steps) -> None:
        """Drive a queue's loop (:meth:`_transmit_steps`, :meth:`_receive_steps`) from a
        trio task: each wait it yields is awaited."""
        loop = steps(context)
        try:
            for kind, argument in loop:
                if kind is _Wait.KICK:
                    await context.wait_kick(int(argument))
                elif kind is _Wait.READABLE:
                    await trio.lowlevel.wait_readable(int(argument))
                elif kind is _Wait.WRITABLE:
                    await trio.lowlevel.wait_writable(int(argument))
                elif kind is _Wait.SLEEP:
                    await trio.sleep(argument)
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            loop.close()

    async def _serve_in_thread(self, context: DeviceContext, index: int, steps: _Steps,
                               kick_fd: Callable[[int], int], call_fd: object) -> None:
        """Drive a queue's loop from an I/O thread of its own (blk's pattern: a stop
        eventfd and flag, set when the task is cancelled; the thread checks them between
        batches, so a batch that was started is always completed and signalled)."""
        kick = kick_fd(index)
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stopping = threading.Event()

        def stop() -> None:
            stopping.set()
            os.eventfd_write(stop_fd, 1)

        # Every fd the thread reads or writes, for its filter: the tap, its kick and stop
        # eventfds, the irqfd that signal_used writes, stderr and stdout (log lines).
        if callable(call_fd):  # one per queue (the vhost-user back-end)
            call_fd = call_fd(index)
        owned_fds = None if not isinstance(call_fd, int) else frozenset(
            fd for fd in (self.tap.fd, kick, stop_fd, call_fd, 1, 2) if fd >= 0)
        direction = "RX" if index == RX_QUEUE else "TX"
        try:
            await run_in_own_thread(
                lambda: self._drive_blocking(context, index, steps, kick, stop_fd,
                                             stopping),
                on_cancel=stop, name=f"avmm {self.name} {direction}",
                seccomp_kind=ThreadKind.DEVICE_IO, seccomp_fds=owned_fds)
        finally:
            os.close(stop_fd)

    @staticmethod
    def _drive_blocking(context: DeviceContext, index: int, steps: _Steps, kick_fd: int,
                        stop_fd: int, stopping: threading.Event) -> None:
        """The I/O thread's side of :meth:`_serve_in_thread`: each wait is a poll(2) on
        the fd (and the stop eventfd), a timed wait on ``stopping``, or nothing."""
        kicks_received = getattr(context, "kicks_received", None)
        poller = select.poll()
        poller.register(stop_fd, select.POLLIN)
        # The first wait for a kick returns at once: the driver may have made buffers
        # available (and kicked) before DRIVER_OK started us.
        primed = True
        loop = steps(context)
        try:
            for kind, argument in loop:
                if stopping.is_set():
                    return
                if kind is _Wait.KICK:
                    if primed:
                        primed = False
                        continue
                    while not stopping.is_set():
                        try:
                            kicks = os.eventfd_read(kick_fd)
                        except BlockingIOError:
                            _poll_one(poller, kick_fd, select.POLLIN)
                            continue
                        if kicks_received is not None:
                            kicks_received(index, kicks)
                        break
                elif kind is _Wait.READABLE:
                    _poll_one(poller, int(argument), select.POLLIN)
                elif kind is _Wait.WRITABLE:
                    _poll_one(poller, int(argument), select.POLLOUT)
                elif kind is _Wait.SLEEP:
                    stopping.wait(argument)
        finally:
            loop.close()

    def _release_chains(self) -> None:
        """Forget the receive chains held (the transport gives them back or resets the
        queue). A frame that was waiting for more buffers is dropped, counted: its
        first part is in a buffer that goes back unused."""
        if self._rx_frame_length:
            self.stats.rx_dropped += 1
            self._rx_frame_length = 0
        self._rx_chains.clear()
        self._tx_held = None

    # -- transmit -----------------------------------------------------------------------

    def _transmit_steps(self, context: DeviceContext) -> Iterator[_Step]:
        """The transmit queue's loop, yielding its waits (see :meth:`run`): the frames of
        a batch are sent synchronously (:meth:`_transmit_batch`), one ``writev`` each
        and no coroutine of its own. The tap takes a frame at once or not at all, so only
        a full tap queue (EAGAIN) makes the loop wait inside a batch."""
        queue = context.queues[TX_QUEUE]
        if queue is None:
            return
        memory = context.memory
        batch_limit = queue.state.size
        while True:
            if self._tx_held is None:
                yield _Wait.KICK, TX_QUEUE
            while True:
                queue.disable_notifications(memory)
                # A batch is at most one ring's worth, so that a driver that keeps
                # refilling still gets its interrupts and other tasks get to run.
                handled, blocked = self._transmit_some(memory, queue, batch_limit)
                while blocked is not None:
                    # The tap's queue is full: give back what went out so far, send
                    # the frame when the tap has room, and go on with the batch.
                    if handled:
                        context.signal_used(TX_QUEUE)
                    while not self._send(memory, blocked):
                        yield _Wait.WRITABLE, self.tap.fd
                    queue.push(memory, blocked.head, 0)
                    handled += 1
                    more, blocked = self._transmit_some(memory, queue, batch_limit - handled)
                    handled += more
                if handled:
                    context.signal_used(TX_QUEUE)
                if self._tx_held is not None:
                    yield _Wait.SLEEP, limiter_wait_s(self._tx_wait_ns)
                    continue
                yield _Wait.YIELD, 0
                if handled < batch_limit and not queue.enable_notifications(memory):
                    break

    def _transmit_some(self, memory: MemoryAccess, queue: VirtQueue,
                       limit: int) -> tuple[int, DescriptorChain | None]:
        """:meth:`_transmit_batch`, or its rate-limited form while there is a limiter
        (or a chain it held)."""
        if self.tx_throttle is None and self._tx_held is None:
            return self._transmit_batch(memory, queue, limit)
        return self._transmit_limited(memory, queue, limit)

    def _transmit_limited(self, memory: MemoryAccess, queue: VirtQueue,
                          limit: int) -> tuple[int, DescriptorChain | None]:
        """Like :meth:`_transmit_batch`, each chain admitted by the TX limiter first; the
        first one refused is kept in ``_tx_held`` (with the wait) and ends the batch."""
        throttle = self.tx_throttle
        handled = 0
        while handled < limit:
            chain = self._tx_held
            if chain is not None:
                self._tx_held = None
            elif (chain := queue.pop(memory)) is None:
                break
            frame_length = chain.readable_length - NET_HEADER_SIZE
            # A frame _send drops for its size costs nothing: a chain can claim up to
            # 4 GiB, and charging it would put the limiter (a daemon group shared
            # with other VMs included) deep in debt for a frame that never goes out.
            if throttle is not None and MIN_FRAME_SIZE <= frame_length <= MAX_FRAME_SIZE:
                wait = throttle.admit(frame_length)
                if wait:
                    self._tx_held, self._tx_wait_ns = chain, wait
                    break
            if not self._send(memory, chain):
                return handled, chain
            queue.push(memory, chain.head, 0)
            handled += 1
        return handled, None

    def _transmit_batch(self, memory: MemoryAccess, queue: VirtQueue,
                        limit: int) -> tuple[int, DescriptorChain | None]:
        """Send the frames of up to ``limit`` available chains and return the chains to
        the used ring. Returns how many were returned, and the chain whose frame the tap
        could not take yet (taken from the ring, not returned), if any.

        The usual case, header and frame in one buffer, is sent from here; any other
        layout goes through :meth:`_send`, which knows every rule.
        """
        fast = self._fast_tx
        if fast is not None and queue.may_take() and fast.usable(memory):
            return self._transmit_fast(fast, memory, queue, limit)
        return self._transmit_python(memory, queue, limit)

    def _transmit_fast(self, fast: NetFastPath, memory: MemoryAccess, queue: VirtQueue,
                       limit: int) -> tuple[int, DescriptorChain | None]:
        """:meth:`_transmit_batch` by the C loop (avmm.virtio.net_fast), each chain it
        leaves (another shape, a frame to drop, a tap error) sent the Python way."""
        handled = 0
        stats = self.stats
        while handled < limit:
            if handled and not queue.may_take():
                break  # pausing: take nothing more
            batch = fast.transmit(queue, memory, self.tap.fd, limit - handled,
                                  self._tx_offloads)
            handled += batch.frames
            stats.tx_frames += batch.frames
            stats.tx_bytes += batch.bytes
            if batch.stop == net_fast.TAP_BLOCKED:
                # The Python path holds the chain while it waits for the tap.
                return handled, queue.pop(memory)
            if batch.stop != net_fast.SLOW:
                break
            more, blocked = self._transmit_python(memory, queue, 1)
            handled += more
            if blocked is not None or not more:
                return handled, blocked
        return handled, None

    def _transmit_python(self, memory: MemoryAccess, queue: VirtQueue,
                         limit: int) -> tuple[int, DescriptorChain | None]:
        """:meth:`_transmit_batch` in Python: every layout, every rule."""
        pop = queue.pop
        push = queue.push
        view = memory.view
        writev = os.writev
        fd = self.tap.fd
        # With offloads every frame goes through _send, which builds its header.
        offloads = self._tx_offloads
        handled = frames = frame_bytes = 0
        try:
            while handled < limit and (chain := pop(memory)) is not None:
                readable = chain.readable
                if len(readable) == 1 and not chain.writable and not offloads:
                    address, length = readable[0]
                    frame_length = length - NET_HEADER_SIZE
                else:
                    address = frame_length = 0
                if MIN_FRAME_SIZE <= frame_length <= MAX_FRAME_SIZE:
                    try:
                        # The guest's header is not passed on (see the module doc).
                        writev(fd, [_ZERO_HEADER, view(address + NET_HEADER_SIZE,
                                                       frame_length)])
                    except BlockingIOError:
                        return handled, chain
                    except OSError as e:
                        # EIO: the interface is down; EINVAL: the kernel refused it.
                        self._drop_transmit(chain, frame_length, "tap refused it",
                                            error=os.strerror(e.errno or 0))
                    else:
                        frames += 1
                        frame_bytes += frame_length
                elif not self._send(memory, chain):
                    return handled, chain
                push(memory, chain.head, 0)
                handled += 1
        finally:
            stats = self.stats
            stats.tx_frames += frames
            stats.tx_bytes += frame_bytes
        return handled, None

    def _send(self, memory: MemoryAccess, chain: DescriptorChain) -> bool:
        """Send the chain's frame to the tap (or drop it, counted). False only if the
        tap would block: then nothing was sent and the chain is still the caller's."""
        if chain.writable:
            raise DeviceNeedsReset(
                f"transmit chain {chain.head} has device-writable buffers "
                "(virtio-net sends frames from device-readable buffers only)"
            )
        readable = chain.readable
        iov: list[bytes | memoryview]
        frame_length = chain.readable_length - NET_HEADER_SIZE
        if frame_length < MIN_FRAME_SIZE or frame_length > MAX_FRAME_SIZE:
            return self._drop_transmit(chain, frame_length, "bad size")
        header = _ZERO_HEADER
        if self._tx_offloads:
            header = transmit_header(chain.read(memory, 0, NET_HEADER_SIZE),
                                     self._tx_offloads)
            if header is None:
                return self._drop_transmit(chain, frame_length,
                                           "segmentation never negotiated")
        if len(readable) == 1:
            # The usual layout: header and frame in one buffer.
            address, _ = readable[0]
            iov = [header, memory.view(address + NET_HEADER_SIZE, frame_length)]
        else:
            iov = [header]
            skip = NET_HEADER_SIZE
            for address, length in readable:
                if skip >= length:
                    skip -= length
                    continue
                iov.append(memory.view(address + skip, length - skip))
                skip = 0
            if len(iov) > _IOV_MAX:
                iov = [header, chain.read(memory, NET_HEADER_SIZE)]
        try:
            os.writev(self.tap.fd, iov)
        except BlockingIOError:
            return False
        except OSError as e:
            # EIO: the interface is down; EINVAL: the kernel refused the frame.
            return self._drop_transmit(chain, frame_length, "tap refused it",
                                       error=os.strerror(e.errno or 0))
        stats = self.stats
        stats.tx_frames += 1
        stats.tx_bytes += frame_length
        return True

    def _drop_transmit(self, chain: DescriptorChain, frame_length: int, reason: str,
                       **fields: object) -> bool:
        self.stats.tx_dropped += 1
        self._log.debug("transmit frame dropped", reason=reason, head=chain.head,
                        length=frame_length, **fields)
        return True

    # -- receive ------------------------------------------------------------------------

    def _pop_receive_chain(self, queue: VirtQueue, memory: MemoryAccess,
                           mergeable: bool, *, written: bool = False) -> DescriptorChain | None:
        # written: the C loop put a frame into its buffer already (VirtQueue.take).
        chain = queue.take(memory) if written else queue.pop(memory)
        if chain is None:
            return None
        if chain.readable:
            raise DeviceNeedsReset(
                f"receive chain {chain.head} has device-readable buffers "
                "(receive buffers must be device-writable)"
            )
        if mergeable and chain.writable_length < NET_HEADER_SIZE:
            raise DeviceNeedsReset(
                f"receive buffer {chain.head} has {chain.writable_length} bytes: with "
                f"VIRTIO_NET_F_MRG_RXBUF each must hold at least the {NET_HEADER_SIZE}-byte "
                "header"
            )
        self._rx_chains.append(chain)
        return chain

    def _wait_for_receive_buffers(self, context: DeviceContext,
                                  queue: VirtQueue) -> Iterator[_Step]:
        """The driver gave us no (or too few) buffers: ask for a kick and wait for it,
        unless buffers arrived while we were asking."""
        memory = context.memory
        if queue.enable_notifications(memory):
            yield _Wait.YIELD, 0
        else:
            yield _Wait.KICK, RX_QUEUE
        # While we hold buffers, the driver need not tell us about more.
        queue.disable_notifications(memory)

    def _receive_steps(self, context: DeviceContext) -> Iterator[_Step]:
        """The receive queue's loop, yielding its waits (see :meth:`run`)."""
        queue = context.queues[RX_QUEUE]
        if queue is None:
            return
        memory = context.memory
        mergeable = bool(context.features & VIRTIO_NET_F_MRG_RXBUF)
        fast = self._fast_rx
        queue.disable_notifications(memory)
        while True:
            if self._rx_frame_length:
                # A frame waits for more buffers.
                placed = self._place_frame(memory, queue, mergeable)
                if placed is None:
                    yield from self._wait_for_receive_buffers(context, queue)
                elif placed:
                    context.signal_used(RX_QUEUE)
                continue
            throttle = self.rx_throttle
            if (throttle is None and fast is not None and queue.may_take()
                    and fast.usable(memory)):
                used, ended = self._receive_fast(fast, memory, queue, mergeable)
                if used:
                    context.signal_used(RX_QUEUE)
                if ended == _TAP_EMPTY:
                    yield _Wait.READABLE, self.tap.fd
                elif ended == _NO_BUFFERS:
                    yield from self._wait_for_receive_buffers(context, queue)
                else:
                    yield _Wait.YIELD, 0
                continue
            if not self._rx_chains and self._pop_receive_chain(
                    queue, memory, mergeable) is None:
                yield from self._wait_for_receive_buffers(context, queue)
                continue
            if throttle is None:
                used, tap_empty = self._receive_batch(memory, queue, mergeable)
            else:
                used, tap_empty, wait = self._receive_limited(memory, queue, mergeable,
                                                              throttle)
                if wait:
                    if used:
                        context.signal_used(RX_QUEUE)
                    yield _Wait.SLEEP, limiter_wait_s(wait)
                    continue
            if used:
                context.signal_used(RX_QUEUE)
            # The tap is read before it is waited for: while frames keep coming, a batch
            # costs one checkpoint rather than an epoll registration and wake-up.
            if tap_empty:
                yield _Wait.READABLE, self.tap.fd
            else:
                yield _Wait.YIELD, 0

    def _receive_fast(self, fast: NetFastPath, memory: MemoryAccess, queue: VirtQueue,
                      mergeable: bool) -> tuple[int, int]:
        """Up to :data:`_RX_BATCH` frames by the C loop (avmm.virtio.net_fast), and what
        made it stop the Python way: a chain of another shape (one frame by
        :meth:`_receive_batch`), a frame larger than its buffer (:meth:`_place_frame`),
        a tap error. Returns the chains used and why the batch ended (_TAP_EMPTY,
        _NO_BUFFERS, _MORE: the batch is full, or the Python path holds chains now).

        What the guest sees is what the Python loop gives it, chain for chain: that loop
        takes a receive buffer before it reads the tap, so this one takes the next
        buffer when the tap runs dry (a hostile chain is refused then, not later), and
        that buffer gets the next frame the Python way."""
        stats = self.stats
        used = 0
        budget = _RX_BATCH
        if self._rx_chains:
            # The buffer taken before the tap ran dry (below) gets the next frame.
            used, tap_empty = self._receive_batch(memory, queue, mergeable, limit=1)
            if tap_empty:
                return used, _TAP_EMPTY
            budget -= 1
            if self._rx_chains:
                return used, _MORE
        while budget > 0:
            if used and not queue.may_take():
                break  # pausing: take nothing more
            batch = fast.receive(queue, memory, self.tap.fd, budget, mergeable,
                                 self._rx_header_kept)
            stats.rx_frames += batch.frames
            stats.rx_bytes += batch.bytes
            if batch.dropped:
                stats.rx_dropped += batch.dropped
                self._log.debug("received frames dropped", count=batch.dropped,
                                reason="shorter than an Ethernet header")
            used += batch.frames
            budget -= batch.frames + batch.dropped
            if batch.kept:
                # A runt went into a buffer the C loop did not take: take it, so that a
                # buffer written into is always one the device holds.
                self._pop_receive_chain(queue, memory, mergeable)
            stop = batch.stop
            if stop == net_fast.EMPTY:
                # Take the next buffer before waiting for the tap, as the Python loop
                # does: a hostile chain is refused now, not when a frame comes.
                if not self._rx_chains and self._pop_receive_chain(
                        queue, memory, mergeable) is None:
                    return used, _NO_BUFFERS
                return used, _TAP_EMPTY
            if stop == net_fast.NO_BUFFERS:
                return used, _NO_BUFFERS
            if stop == net_fast.LIMIT:
                break
            if stop == net_fast.TAP_ERROR:
                raise self._read_error(OSError(batch.error, os.strerror(batch.error)))
            budget -= 1
            if stop == net_fast.OVERFLOW:
                placed = self._place_overflow(memory, queue, mergeable, batch)
            else:  # SLOW: one frame the Python way
                placed, tap_empty = self._receive_batch(memory, queue, mergeable, limit=1)
                if tap_empty:
                    return used + placed, _TAP_EMPTY
                if not placed and not self._rx_chains:
                    return used, _NO_BUFFERS  # it found no buffer to take
            if placed is None:
                return used, _MORE
            used += placed
            if self._rx_chains:
                break
        return used, _MORE

    def _place_overflow(self, memory: MemoryAccess, queue: VirtQueue, mergeable: bool,
                        batch: FastBatch) -> int | None:
        """The C loop read a frame larger than the buffer of the chain at the queue's
        position (its first part is there, the rest in the bounce buffer): take that
        chain the Python way and place the frame (:meth:`_place_frame`)."""
        self._rx_frame_length = batch.total
        chain = self._pop_receive_chain(queue, memory, mergeable, written=True)
        if chain is None:
            return self._drop_frame("the receive ring changed under the device")
        capacity = min(chain.writable_length, len(self._rx_buffer) - 1)
        if (len(chain.writable) != 1 or capacity != batch.first
                or chain.writable[0].address != batch.address):
            # The driver rewrote the descriptor meanwhile: its frame is lost.
            return self._drop_frame("the receive ring changed under the device")
        self._rx_first_length = batch.first
        self._rx_overflow_start = 0
        self._rx_overflow_end = batch.total - batch.first
        return self._place_frame(memory, queue, mergeable)

    def _receive_batch(self, memory: MemoryAccess, queue: VirtQueue, mergeable: bool,
                       limit: int = _RX_BATCH) -> tuple[int, bool]:
        """Move up to ``limit`` frames from the tap to receive buffers while the
        driver has buffers. Returns how many chains went back to the used ring, and
        whether the batch ended because the tap had nothing more to read.

        The usual case, a frame that fits the single buffer of a one-buffer chain, is
        handled here in one ``readv`` and one header store; anything else goes through
        :meth:`_place_frame`, which knows every rule.
        """
        chains = self._rx_chains
        fd = self.tap.fd
        bounce = self._rx_buffer
        # The part of a buffer a frame can use at most.
        capacity_limit = len(bounce) - 1
        view = memory.view
        push = queue.push
        readv = os.readv
        used = frames = frame_bytes = 0
        tap_empty = False
        kept = self._rx_header_kept
        try:
            for _ in range(limit):
                if not chains and self._pop_receive_chain(queue, memory, mergeable) is None:
                    break
                chain = chains[0]
                writable = chain.writable
                if len(writable) == 1:
                    address, length = writable[0]
                    first = view(address, min(length, capacity_limit))
                    try:
                        total = readv(fd, [first, bounce])
                    except BlockingIOError:
                        tap_empty = True
                        break
                    except OSError as e:
                        raise self._read_error(e) from e
                    first_length = len(first)
                    if _SMALLEST_RECEIVED <= total <= first_length:
                        # The whole frame is in the buffer (which holds the header too).
                        if kept:
                            first[_NUM_BUFFERS:NET_HEADER_SIZE] = _ONE_BUFFER
                        else:
                            first[:NET_HEADER_SIZE] = _ONE_BUFFER_HEADER
                        # After the writes (see avmm.migration.dirty).
                        dirty = memory.dirty
                        if dirty is not None:
                            dirty.mark(address, total)
                        push(memory, chain.head, total)
                        del chains[0]
                        used += 1
                        frames += 1
                        frame_bytes += total - NET_HEADER_SIZE
                        continue
                    self._rx_overflow_start = 0
                    self._rx_overflow_end = max(total - first_length, 0)
                    self._rx_frame_length = total
                    self._rx_first_length = min(total, first_length)
                    # In guest RAM now, even if the frame is dropped later.
                    memory.mark_dirty(address, min(total, first_length))
                elif not self._read_frame(memory):
                    tap_empty = True
                    break
                placed = self._place_frame(memory, queue, mergeable)
                if placed is None:
                    break
                used += placed
        finally:
            stats = self.stats
            stats.rx_frames += frames
            stats.rx_bytes += frame_bytes
        return used, tap_empty

    def _receive_limited(self, memory: MemoryAccess, queue: VirtQueue, mergeable: bool,
                         throttle: Throttle) -> tuple[int, bool, int]:
        """:meth:`_receive_batch` frame by frame through the general path, reading the
        tap only while the RX limiter has room (see the module docstring). Returns the
        chains used, whether the tap ran dry, and the ns to wait (0: not limited)."""
        chains = self._rx_chains
        used = 0
        for _ in range(_RX_BATCH):
            if not chains and self._pop_receive_chain(queue, memory, mergeable) is None:
                break
            wait = throttle.ready()
            if wait:
                return used, False, wait
            if not self._read_frame(memory):
                return used, True, 0
            throttle.charge(max(self._rx_frame_length - NET_HEADER_SIZE, 0))
            placed = self._place_frame(memory, queue, mergeable)
            if placed is None:
                break
            used += placed
        return used, False, 0

    def _read_error(self, e: OSError) -> TapError:
        return TapError(f"reading tap {self.tap.name!r} failed: {os.strerror(e.errno or 0)}",
                        name=self.tap.name, errno=e.errno)

    def _read_frame(self, memory: MemoryAccess) -> bool:
        """Read one frame from the tap into the first held chain (and the bounce buffer
        for the rest). False if the tap has nothing to read."""
        chain = self._rx_chains[0]
        bounce = self._rx_buffer
        # The part of the first chain a frame can use at most.
        first_capacity = min(chain.writable_length, len(bounce) - 1)
        iov: list[memoryview | bytearray] = []
        room = first_capacity
        for address, length in chain.writable:
            if not room:
                break
            take = min(length, room)
            iov.append(memory.view(address, take))
            room -= take
        zero_copy = len(iov) < _IOV_MAX
        if zero_copy:
            iov.append(bounce)
        else:
            iov = [bounce]
        try:
            total = os.readv(self.tap.fd, iov)
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._read_error(e) from e
        if zero_copy:
            self._rx_overflow_start = 0
            self._rx_overflow_end = max(total - first_capacity, 0)
            # readv filled the chain's buffers in order (chain.write marks for itself).
            dirty = memory.dirty
            if dirty is not None:
                left = min(total, first_capacity)
                for address, length in chain.writable:
                    if left <= 0:
                        break
                    dirty.mark(address, min(length, left))
                    left -= length
        else:
            chain.write(memory, memoryview(bounce)[:min(total, first_capacity)])
            self._rx_overflow_start = first_capacity
            self._rx_overflow_end = max(total, first_capacity)
        self._rx_frame_length = total
        self._rx_first_length = min(total, first_capacity)
        return True

    def _drop_frame(self, reason: str) -> int:
        self.stats.rx_dropped += 1
        self._log.debug("received frame dropped", reason=reason,
                        length=self._rx_frame_length - NET_HEADER_SIZE)
        self._rx_frame_length = 0
        return 0

    def _place_frame(self, memory: MemoryAccess, queue: VirtQueue,
                     mergeable: bool) -> int | None:
        """Return the frame read by :meth:`_read_frame` to the driver. Returns how many
        chains were used (0: the frame was dropped and the chains are kept for the next
        one), or None if it needs more buffers than the driver has given yet."""
        total = self._rx_frame_length
        if total < NET_HEADER_SIZE + MIN_FRAME_SIZE:
            return self._drop_frame("shorter than an Ethernet header")
        if total > NET_HEADER_SIZE + MAX_FRAME_SIZE:
            return self._drop_frame("longer than the largest frame")
        chains = self._rx_chains
        first_length = self._rx_first_length
        if total == first_length:
            chain = chains[0]
            address, length = chain.writable[0]
            if self._rx_header_kept:
                chain.write(memory, _ONE_BUFFER, _NUM_BUFFERS)
            elif length >= NET_HEADER_SIZE:
                memory.view(address, NET_HEADER_SIZE)[:] = _ONE_BUFFER_HEADER
                memory.mark_dirty(address, NET_HEADER_SIZE)
            else:
                chain.write(memory, _ONE_BUFFER_HEADER)
            queue.push(memory, chain.head, total)
            del chains[0]
            self._received(total)
            return 1
        if not mergeable or first_length < NET_HEADER_SIZE:
            return self._drop_frame("larger than the receive buffer")
        overflow = self._rx_overflow_end - self._rx_overflow_start
        capacity = 0
        count = 1
        while capacity < overflow:
            if count == len(chains) and self._pop_receive_chain(
                    queue, memory, mergeable) is None:
                if len(chains) >= queue.state.size:
                    # Every buffer of the queue is ours and still not enough.
                    return self._drop_frame("larger than all receive buffers together")
                return None
            capacity += chains[count].writable_length
            count += 1
        source = memoryview(self._rx_buffer)[self._rx_overflow_start:self._rx_overflow_end]
        written = [first_length]
        offset = 0
        for chain in chains[1:count]:
            done = chain.write(memory, source[offset:])
            written.append(done)
            offset += done
        if self._rx_header_kept:
            chains[0].write(memory, _NUM_BUFFERS_FIELD.pack(count), _NUM_BUFFERS)
        else:
            chains[0].write(memory, NET_HEADER.pack(0, 0, 0, 0, 0, 0, count))
        # In ring order: the driver reads num_buffers from the first and takes the rest.
        for chain, length in zip(chains[:count], written, strict=True):
            queue.push(memory, chain.head, length)
        del chains[:count]
        self._received(total)
        return count

    def _received(self, total: int) -> None:
        self._rx_frame_length = 0
        self.stats.rx_frames += 1
        self.stats.rx_bytes += total - NET_HEADER_SIZE

