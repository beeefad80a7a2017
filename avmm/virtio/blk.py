"""virtio-blk (virtio 1.2 §5.2) over a raw image file or a host block device.

One request queue. The device pops every available request chain, does all their file
I/O — ``preadv``/``pwritev`` straight between the file and guest memory, no intermediate
copies — then returns the whole batch to the used ring and signals the driver once.
Requests in a batch run in ring order, so a FLUSH sees every write the driver queued
before it.

Where that runs. When the transport hands over the queue's kick eventfd
(``context.kick_fd(0)``, as the in-process virtio-mmio slot and the vhost-user back-end
do), the queue gets its own
I/O thread that blocks on that eventfd and serves each batch synchronously, signalling
the driver through ``context.signal_used`` (thread-safe) right from there: a request costs
no trio wake-up and no worker-thread hand-off, which at queue depth 1 was most of its
latency. Otherwise (a test's context) the trio task waits with
``wait_kick`` and does each batch's file I/O in a worker thread. Either way the queue is
touched by one thread at a time, and a cancelled :meth:`BlockDevice.run` returns only after
the batch in flight is on the used ring.

In the I/O thread, IN and OUT requests of well-formed chains are served by a C loop
(:mod:`avmm.virtio.blk_fast`, outside the GIL) that returns each to the used ring as soon
as its transfer is done, so a polling driver refills while the rest of the batch is
served; it stops before any other request and the Python path below takes the ring from
there, so every rule here holds for both (:meth:`BlockDevice.serve_batch`). Rate limits
keep to the Python path. Where the transport also lets the device write the irqfd
itself and tells it when the VM starts to pause (``context.direct_used_fd`` and
``context.on_pause``, as the in-process slot does), the thread's whole loop runs in C
(``blk_fast``'s run: batches, notifications, interrupts, the waits for kicks, and a short
look for the driver's next request before it sleeps), so that a request takes the GIL
not at all and, in a process that runs many VMs, waits for no other VM's Python; it
comes back to Python for what the C loop does not serve, a stop, a pause, a new rate
limit, and at least every 20 ms while it completes requests, to publish its counters.

Who is at fault decides how a request ends:

* the driver asked for something the disk cannot do (out of range, a read-only disk, a
  data length that is not whole sectors, an unknown type): the request ends in-band with
  ``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP``;
* the host failed (EIO, ENOSPC, ...): ``VIRTIO_BLK_S_IOERR`` for that request and a log
  line once per kind of failure — never an exception out of the device;
* the driver broke the protocol (no room for the header, no device-writable byte for the
  status, a buffer outside guest RAM): :class:`~avmm.virtio.device.DeviceNeedsReset`,
  after the requests before it in the batch have been completed.

Rate limits (:mod:`avmm.ratelimit`): with a :attr:`BlockDevice.throttle`, each chain is
admitted as it is taken, costing one op and its data bytes (what the driver reads past
the 16-byte header plus what it gets back before the status byte). The first chain the
limiter refuses ends the batch and stays held, taken from the ring and not yet served;
the batch before it is completed and signalled, then the serving thread (or task) waits
on a timer (``threading.Event.wait``, woken early by a stop; ``trio.sleep`` on the event
loop) and serves the held chain first when it is admitted. A stop meanwhile leaves the
held chain to the transport, which gives it back to the driver like any chain taken and
not returned. Unlimited (``throttle`` None, the default) the loop is the one above, with
one attribute test per batch.

Write cache: the device offers VIRTIO_BLK_F_FLUSH. A driver that negotiates it gets a
writeback cache and makes writes stable with FLUSH (``fdatasync``). A driver that does
not gets writethrough semantics (§5.2.6.2, case 1): every batch that wrote anything is
``fdatasync``-ed before its requests are completed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import select
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import trio

from .._packed import Packed
from ..devices._state import DeviceStateError, check_bool, check_state_class, check_uint
from ..errors import AvmmError, GuestMemoryError
from ..isolation.syscalls import ThreadKind
from ..ratelimit import limiter_wait_s
from ..state._widths import U64
from ..threads import run_in_own_thread
from . import blk_fast
from .device import (
    DeviceContext,
    DeviceId,
    DeviceNeedsReset,
    VirtioDevice,
    offered_queue_size,
)

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from ..ratelimit import Throttle
    from .queue import Buffer, DescriptorChain, VirtQueue

log = structlog.get_logger(__name__)

# Device feature bits (virtio 1.2 §5.2.3), as masks like device.py's common ones.
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

#: The protocol's sector: every ``sector`` and ``capacity`` is in these units (§5.2.4).
SECTOR_SIZE = 512
SECTOR_SHIFT = 9

#: The ring size offered by default (QueueNumMax in-process).
QUEUE_SIZE = 256
#: The largest ring the device serves: what a vhost-user front-end may choose (QEMU's
#: vhost-user-blk ``queue-size`` goes up to 1024); see BlockDevice's ``queue_size``.
LARGEST_QUEUE_SIZE = 1024
#: A request is header + data segments + status, so a chain of QUEUE_SIZE descriptors
#: has room for this many data segments.
SEG_MAX = QUEUE_SIZE - 2
#: Per-request bounds for DISCARD / WRITE_ZEROES, so that one request's work (WRITE_ZEROES
#: may fall back to writing zeroes) stays bounded. Linux splits its requests to fit.
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
#: Hole punching works in file-system blocks; tell the driver to align discards to 4 KiB.
DISCARD_SECTOR_ALIGNMENT = 8

#: Length of the GET_ID answer (§5.2.6): NUL-padded ASCII, no NUL when 20 bytes long.
ID_BYTES = 20

#: ``preadv``/``pwritev`` take at most this many buffers per call (Linux UIO_MAXIOV).
IOV_MAX = 1024


class RequestType(IntEnum):
    """``virtio_blk_req.type`` (virtio 1.2 §5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    """``virtio_blk_req.status``."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# Module-level names for the hot path: a global lookup instead of an enum attribute.
_IN, _OUT, _FLUSH, _GET_ID = RequestType.IN, RequestType.OUT, RequestType.FLUSH, RequestType.GET_ID
_DISCARD, _WRITE_ZEROES = RequestType.DISCARD, RequestType.WRITE_ZEROES
_OK, _IOERR, _UNSUPP = Status.OK, Status.IOERR, Status.UNSUPP

#: ``struct virtio_blk_req`` up to the data: type, reserved, sector. Hot path: ``struct``.
REQUEST_HEADER = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: sector, num_sectors, flags.
SEGMENT = struct.Struct("<QII")
SEGMENT_FLAG_UNMAP = 1

#: ``struct virtio_blk_config`` (virtio 1.2 §5.2.4), up to the fields of the features we
#: offer; reads past it are zero-filled. A Packed struct, not construct: every VM with a
#: disk builds it on ``avmm up``'s path, which construct's import would cost ~2 MiB.
BlockConfig = Packed(
    ("capacity", "Q"),
    ("size_max", "I"),
    ("seg_max", "I"),
    ("geometry", Packed(("cylinders", "H"), ("heads", "B"), ("sectors", "B"))),
    ("blk_size", "I"),
    ("topology", Packed(("physical_block_exp", "B"), ("alignment_offset", "B"),
                        ("min_io_size", "H"), ("opt_io_size", "I"))),
    ("writeback", "B"),
    ("", "x"),  # unused0
    ("num_queues", "H"),
    ("max_discard_sectors", "I"),
    ("max_discard_seg", "I"),
    ("discard_sector_alignment", "I"),
    ("max_write_zeroes_sectors", "I"),
    ("max_write_zeroes_seg", "I"),
    ("write_zeroes_may_unmap", "B"),
    ("", "3x"),  # unused1
)
BLOCK_CONFIG_SIZE = BlockConfig.sizeof()

# fallocate(2) modes; Python's os module has posix_fallocate but not these.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _load_fallocate() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()
_NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
_ZEROES = bytes(1 << 16)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (EOPNOTSUPP where the call is not available)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    # ctypes releases the GIL around the call, like os.pwritev does.
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class DiskError(AvmmError):
    """A disk image cannot be opened or used (the message names the file)."""


@dataclass
class BlockStats:
    """Counters for metrics. Requests count when they complete, whatever their status."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    #: Requests of a type the device does not implement (answered UNSUPP).
    unsupported: int = 0
    #: Requests the device refused for the driver's fault: out of range, partial sector,
    #: a write to a read-only disk, malformed segments (answered IOERR).
    rejected: int = 0
    #: Requests that failed because the host's file I/O failed (answered IOERR).
    io_errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_discarded: int = 0
    bytes_zeroed: int = 0
    #: Worker-thread batches, and the chains they carried.
    batches: int = 0
    batched_requests: int = 0


@dataclass
class Batch:
    """Chains popped from the request queue to be processed together; ``error`` is a
    protocol error the queue raised after them (it stops the device once they are done)."""

    chains: list[DescriptorChain]
    error: DeviceNeedsReset | None = None
    #: A chain the rate limiter refused: taken, not in ``chains``, served first next time
    #: (after ``wait_ns``).
    deferred: DescriptorChain | None = None
    wait_ns: int = 0


@dataclass
class BatchResult:
    """What a batch leaves for the used ring: ``(head, bytes written)`` in ring order,
    and the protocol error, if any, that stopped it (chains after it were not touched)."""

    completions: list[tuple[int, int]] = field(default_factory=list)
    error: DeviceNeedsReset | None = None


@dataclass(slots=True)
class _Done:
    head: int
    written: int
    status_byte: memoryview
    #: The guest address of ``status_byte`` (to mark it dirty once written).
    status_address: int
    status: Status
    #: The request changed the disk's contents (what writethrough mode must sync).
    modified: bool


@dataclass(frozen=True)
class BlockState:
    """A virtio-blk device's own state in a snapshot. Nothing is in flight when it is
    taken (the slot's pause waits for the batch in flight), and the data lives in the
    disk image, which stays where it is; what the guest read from the config space
    (capacity, read-only, serial) is recorded so that a restore onto another image is
    refused rather than shown to a guest that cached the old values."""

    STATE_VERSION: ClassVar[int] = 1

    #: VIRTIO_BLK_F_FLUSH negotiated: writes may stay in the host's cache until a flush.
    writeback: bool
    capacity: U64
    read_only: bool
    serial: str


class BlockDevice(VirtioDevice):
    """A virtio-blk disk backed by ``path`` (a raw image file or a block device).

    The capacity is the file's size in whole 512-byte sectors, fixed at construction.
    ``serial`` (at most 20 ASCII bytes) is what GET_ID returns; by default it is derived
    from the file's resolved path, so it is stable across runs. The file stays open
    until :meth:`close`; opening it fails with :class:`DiskError`.

    :meth:`run` serves the queue as :meth:`take_batch` (pop), :meth:`process_batch` (all
    file I/O) and :meth:`complete_batch` (push), in its I/O thread or split between the
    event loop and a worker thread (see the module docstring); a caller without trio (a
    test, a vhost-user backend loop) may chain the three itself. Counters are in
    :attr:`stats`.
    """

    device_id = DeviceId.BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, path: Path, *, read_only: bool = False, serial: str | None = None,
                 name: str = "blk0", queue_size: int = QUEUE_SIZE) -> None:
        # The ring's maximum: a driver behind virtio-mmio takes it as its ring size, a
        # vhost-user front-end chooses its own up to it (the back-end offers the most).
        self.queue_max_sizes = (offered_queue_size(queue_size, LARGEST_QUEUE_SIZE),)
        self.path = Path(path)
        self.read_only = read_only
        self.name = name
        if serial is None:
            serial = self._default_serial(self.path)
        try:
            serial_bytes = serial.encode("ascii")
        except UnicodeEncodeError:
            raise DiskError(f"{self.path}: disk serial {serial!r} is not ASCII") from None
        if len(serial_bytes) > ID_BYTES:
            raise DiskError(
                f"{self.path}: disk serial {serial!r} is longer than {ID_BYTES} bytes"
            )
        self.serial = serial
        #: Negotiated VIRTIO_BLK_F_FLUSH: the driver flushes, so writes may stay cached.
        #: Otherwise the device is writethrough. Set by run(), cleared by reset().
        self.writeback = False
        #: Whether hole punching / FALLOC_FL_ZERO_RANGE work on this file; learnt on
        #: first use (False after the file system said EOPNOTSUPP).
        self.can_punch_holes = True
        self.can_zero_range = True
        self.stats = BlockStats()
        #: (operation, errno) pairs already logged, so a failing disk logs once per kind.
        self.reported_errors: set[tuple[str, int]] = set()
        #: The C loop for the request queue (None: the Python path only); see
        #: :meth:`serve_batch`.
        self._fast = blk_fast.fast_path()
        self._throttle: Throttle | None = None
        self.fd = -1
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise DiskError(f"{self.path}: a disk must be a regular file or a block device")
            # lseek, not st_size: a block device's st_size is 0.
            size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            self.close()
            access = "reading" if read_only else "reading and writing"
            raise DiskError(
                f"cannot open disk image {self.path} for {access}: {e.strerror}"
            ) from e
        except DiskError:
            self.close()
            raise
        self.size = size
        #: Size in 512-byte sectors; a partial last sector is not exposed.
        self.capacity = size >> SECTOR_SHIFT
        if size % SECTOR_SIZE:
            log.warning("disk size is not a multiple of 512 bytes; the tail is not exposed",
                        device=name, path=str(self.path), size=size,
                        hidden_bytes=size % SECTOR_SIZE)

    @property
    def interrupts_directly(self) -> bool:
        """Whether this disk's I/O thread may interrupt the driver from C, writing the
        irqfd itself (where the transport offers ``direct_used_fd``). A transport
        builds its InterruptStatus for it from the start (USED_BUFFER whenever
        activated, as for a vhost-user device): an interrupt taken before the thread
        runs again (after a restore, or on a migration's destination) must find the
        bit, which no ``signal_used`` call sets for it."""
        return self._fast is not None

    @property
    def throttle(self) -> Throttle | None:
        """The rate limiter's handle (avmm.ratelimit.Throttle), None: unlimited. Read
        once per batch by the serving thread, so it may be replaced at any time; a C run
        in progress (which serves unlimited) is told to come back and look."""
        return self._throttle

    @throttle.setter
    def throttle(self, throttle: Throttle | None) -> None:
        self._throttle = throttle
        if self._fast is not None:
            self._fast.interrupt()

    @staticmethod
    def _default_serial(path: Path) -> str:
        # The resolved path, hashed: stable across runs and distinct per image file.
        digest = hashlib.blake2b(os.fsencode(path.resolve()), digest_size=ID_BYTES // 2)
        return digest.hexdigest()

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the image file. The device must not be running."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the transport asks --------------------------------------------------------

    def device_features(self) -> int:
        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.read_only:
            features |= VIRTIO_BLK_F_RO
        else:
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def config_fields(self) -> dict[str, object]:
        """The config space as values; fields of features not offered are zero."""
        writable = not self.read_only
        return {
            "capacity": self.capacity,
            "size_max": 0,
            "seg_max": SEG_MAX,
            "geometry": {"cylinders": 0, "heads": 0, "sectors": 0},
            "blk_size": SECTOR_SIZE,
            "topology": {"physical_block_exp": 0, "alignment_offset": 0,
                         "min_io_size": 0, "opt_io_size": 0},
            "writeback": 0,
            "num_queues": 0,
            "max_discard_sectors": MAX_DISCARD_SECTORS if writable else 0,
            "max_discard_seg": MAX_DISCARD_SEG if writable else 0,
            "discard_sector_alignment": DISCARD_SECTOR_ALIGNMENT if writable else 0,
            "max_write_zeroes_sectors": MAX_WRITE_ZEROES_SECTORS if writable else 0,
            "max_write_zeroes_seg": MAX_WRITE_ZEROES_SEG if writable else 0,
            # Static (a change would need a config notification): WRITE_ZEROES with
            # unmap punches a hole wherever the file system can.
            "write_zeroes_may_unmap": 1 if writable else 0,
        }

    def read_config(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0 or offset >= BLOCK_CONFIG_SIZE:
            return bytes(size)
        space = BlockConfig.build(self.config_fields())
        chunk = space[offset:offset + size]
        return chunk + bytes(size - len(chunk))

    def reset(self) -> None:
        self.writeback = False

    # -- snapshots ----------------------------------------------------------------------

    state_class = BlockState

    def save_state(self) -> BlockState:
        return BlockState(writeback=self.writeback, capacity=self.capacity,
                          read_only=self.read_only, serial=self.serial)

    def restore_state(self, state: BlockState) -> None:
        """Take the write-cache mode back; refuse a state whose disk the guest saw as
        another size, writability or serial than this one's (a different image)."""
        name = self.name
        check_state_class(state, BlockState, name)
        check_bool(name, "writeback", state.writeback)
        check_bool(name, "read_only", state.read_only)
        check_uint(name, "capacity", state.capacity, (1 << 64) - 1)
        if not isinstance(state.serial, str):
            raise DeviceStateError(f"{name} state: serial is not a string")
        for field_name, saved, now in (("capacity", state.capacity, self.capacity),
                                       ("read_only", state.read_only, self.read_only),
                                       ("serial", state.serial, self.serial)):
            if saved != now:
                raise DeviceStateError(
                    f"{name} state: the guest saw {field_name}={saved!r:.40}, the disk "
                    f"{self.path} has {now!r:.40} (restore with the disk it was saved with)")
        self.writeback = state.writeback

    # -- the request queue --------------------------------------------------------------

    async def run(self, context: DeviceContext) -> None:
        """Serve the request queue until cancelled.

        Cancellation never interrupts a batch: the I/O thread is not abandoned, so a
        cancelled ``run`` returns only after the batch in flight has finished and been
        pushed to the used ring (the queue state stays consistent for a snapshot).

        With ``context.kick_fd`` the queue is served by a dedicated thread (see the module
        docstring). That thread consumes the kick eventfd itself; if the context has
        ``kicks_received(queue_index, count)`` it is told how many notifications each
        read took (for the transport's counters). Pausing needs no help from the device:
        the queue a pausing transport hands over takes nothing while paused, and the
        transport kicks the queue on resume.
        """
        queue = context.queues[0] if context.queues else None
        if queue is None:
            return
        self.writeback = bool(context.features & VIRTIO_BLK_F_FLUSH)
        kick_fd = getattr(context, "kick_fd", None)
        try:
            with structlog.contextvars.bound_contextvars(device=self.name):
                if callable(kick_fd):
                    await self._serve_in_thread(context, queue, kick_fd(0))
                else:
                    await self._serve(context, queue)
        finally:
            if self._fast is not None:
                self._fast.forget()  # the guest memory may be unmapped once we stop

    async def _serve_in_thread(self, context: DeviceContext, queue: VirtQueue,
                               kick_fd: int) -> None:
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stopping = threading.Event()

        def stop() -> None:
            stopping.set()
            if self._fast is not None:
                self._fast.interrupt()  # a C run under load looks between batches
            os.eventfd_write(stop_fd, 1)

        # Every fd the thread reads, writes or syncs, for its filter: the image, the kick
        # and stop eventfds, the eventfd that signal_used writes (the irqfd in process,
        # the ring's call fd in the vhost-user back-end), and stderr
        # and stdout (log lines; a worker's stderr is a pipe to its daemon). None of
        # them changes while the thread runs: a PATCH replaces only the throttle, a
        # pause leaves the thread asleep, a restore or a migration builds a new device.
        # A context that does not say where signal_used writes leaves the thread on the
        # wider list (any fd).
        call_fd = getattr(context, "call_fd", None)
        if callable(call_fd):  # one per queue (the vhost-user back-end)
            call_fd = call_fd(0)
        owned_fds = None if not isinstance(call_fd, int) else frozenset(
            fd for fd in (self.fd, kick_fd, stop_fd, call_fd, 1, 2) if fd >= 0)
        try:
            await run_in_own_thread(
                lambda: self._serve_blocking(context, queue, kick_fd, stop_fd, stopping),
                on_cancel=stop, name=f"avmm {self.name} I/O",
                seccomp_kind=ThreadKind.DEVICE_IO, seccomp_fds=owned_fds)
        finally:
            os.close(stop_fd)

    def _serve_blocking(self, context: DeviceContext, queue: VirtQueue, kick_fd: int,
                        stop_fd: int, stopping: threading.Event) -> None:
        """The I/O thread: drain the ring, sleep in poll(2) on the kick eventfd (and the
        stop eventfd), repeat until ``stopping`` is set. Checks for a stop only between
        batches, so a batch that was started is always completed and signalled."""
        poller = select.poll()
        poller.register(kick_fd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        # The whole loop in C where the transport lets the device interrupt the driver
        # by writing an eventfd itself and says when the VM starts to pause (blk_fast's
        # run; the pause makes it come back, and the Python path then takes nothing).
        direct_used_fd = getattr(context, "direct_used_fd", None)
        on_pause = getattr(context, "on_pause", None)
        call_fd = forget_pause = None
        try:
            if self.interrupts_directly and callable(direct_used_fd) and callable(on_pause):
                forget_pause = on_pause(self._fast.interrupt)  # type: ignore[union-attr]
                call_fd = direct_used_fd(0)
            self._serve_loop(context, queue, kick_fd, stop_fd, stopping, poller, call_fd)
        finally:
            if forget_pause is not None:
                forget_pause()

    def _serve_loop(self, context: DeviceContext, queue: VirtQueue, kick_fd: int,
                    stop_fd: int, stopping: threading.Event, poller: select.poll,
                    call_fd: int | None) -> None:
        memory = context.memory
        signal_used = context.signal_used
        kicks_received = getattr(context, "kicks_received", None)
        serve_batch = self.serve_batch
        deferred: DescriptorChain | None = None
        # Drain before the first wait: the driver may have made requests available (and
        # kicked) before DRIVER_OK started us.
        while True:
            while not stopping.is_set():
                if (call_fd is not None and deferred is None
                        and not self._run_fast(queue, memory, kicks_received, kick_fd,
                                               stop_fd, call_fd, stopping)):
                    continue
                queue.disable_notifications(memory)
                more, deferred, wait_ns = serve_batch(queue, memory, signal_used, deferred)
                if deferred is not None:
                    # Rate limited: a timed wait that a stop cuts short.
                    stopping.wait(limiter_wait_s(wait_ns))
                elif not more:
                    break
            # poll(2) first, then read: the read then never fails, which saves a syscall
            # and an exception per request at queue depth 1.
            while True:
                if stopping.is_set():
                    return
                poller.poll()  # releases the GIL; EINTR is retried by Python
                if stopping.is_set():
                    return
                try:
                    kicks = os.eventfd_read(kick_fd)
                except BlockingIOError:
                    continue  # the stop eventfd woke us, or a spurious wake-up
                break
            if kicks_received is not None:
                kicks_received(0, kicks)

    def _run_fast(self, queue: VirtQueue, memory: MemoryAccess,
                  kicks_received: Callable[[int, int], None] | None, kick_fd: int,
                  stop_fd: int, call_fd: int, stopping: threading.Event) -> bool:
        """One C run of the I/O thread (blk_fast's ``run``), where nothing keeps it
        from serving: no stop, no rate limit, a queue that may be taken from and memory
        the C loop can use. Adds what it served to the stats. Returns True where the
        Python path must serve the next batch (it cannot run, or the chain at the
        position is for Python); False: look again (a stop, a limit set meanwhile, or
        only its counters to report)."""
        fast = self._fast
        assert fast is not None
        fast.arm()  # before the looks below: what asks after them interrupts the run
        if stopping.is_set():
            return False
        if self._throttle is not None or not queue.may_take() or not fast.usable(memory):
            return True
        done = fast.run(queue, memory, self.fd, self.capacity,
                        writes=self.writeback and not self.read_only,
                        kick_fd=kick_fd, stop_fd=stop_fd, call_fd=call_fd)
        self._count_fast(done, done.batches)
        if done.kicks and kicks_received is not None:
            kicks_received(0, done.kicks)
        if done.error:
            raise OSError(done.error, f"serving the queue: {os.strerror(done.error)}")
        return done.stop == blk_fast.SLOW

    def _count_fast(self, done: blk_fast.FastBatch, batches: int) -> None:
        """Add what the C loop served to :attr:`stats`."""
        stats = self.stats
        stats.reads += done.reads
        stats.writes += done.writes
        stats.bytes_read += done.bytes_read
        stats.bytes_written += done.bytes_written
        stats.batches += batches
        stats.batched_requests += done.requests

    async def _serve(self, context: DeviceContext, queue: VirtQueue) -> None:
        memory = context.memory
        deferred: DescriptorChain | None = None
        while True:
            if deferred is None:
                await context.wait_kick(0)
            while True:
                queue.disable_notifications(memory)
                batch = self.take_batch(queue, memory, deferred)
                deferred = batch.deferred
                result = None
                if batch.chains:
                    result = await trio.to_thread.run_sync(
                        self.process_batch, memory, batch, abandon_on_cancel=False,
                        thread_name=f"avmm {self.name} I/O",
                    )
                # No checkpoint between the thread's return and the pushes: even a
                # cancelled run() completes the batch it started.
                more = self.finish_batch(queue, memory, batch, result, context.signal_used)
                if deferred is not None:
                    await trio.sleep(limiter_wait_s(batch.wait_ns))
                elif not more:
                    break

    def serve_batch(self, queue: VirtQueue, memory: MemoryAccess,
                    signal_used: Callable[[int], None],
                    deferred: DescriptorChain | None = None,
                    ) -> tuple[bool, DescriptorChain | None, int]:
        """One batch of the I/O thread's loop, with notifications disabled by the
        caller: the C loop (:mod:`avmm.virtio.blk_fast`) where it applies, then, from
        wherever it stopped, :meth:`take_batch`, :meth:`process_batch` and
        :meth:`finish_batch`. Blocks on the file I/O. Returns whether more chains may be
        waiting (drain again), the chain the rate limiter held (``deferred`` for the
        next call) and how long to wait before it, in nanoseconds.

        The C loop runs while nothing is held and no :attr:`throttle` is set (rate
        limits stay with the Python path). A batch it served is signalled, and the
        ring is looked at again before notifications are re-enabled: a polling driver
        refills while a batch is served, and its new requests are then taken without a
        notification."""
        fast = self._fast
        if (fast is not None and deferred is None and self.throttle is None
                and queue.may_take() and fast.usable(memory)):
            done = fast.serve(queue, memory, self.fd, self.capacity,
                              writes=self.writeback and not self.read_only,
                              limit=QUEUE_SIZE)
            if done.requests:
                self._count_fast(done, 1)
                signal_used(0)
            if done.stop == blk_fast.LIMIT:
                return True, None, 0
            if done.stop == blk_fast.EMPTY:
                return bool(done.requests) or queue.enable_notifications(memory), None, 0
            if done.requests:
                # SLOW after a batch: back to the caller first, which looks for a stop
                # between batches; the next call finds the same chain and goes on below.
                return True, None, 0
            # SLOW: the Python path takes the ring from the chain the C loop left.
        batch = self.take_batch(queue, memory, deferred)
        result = self.process_batch(memory, batch) if batch.chains else None
        more = self.finish_batch(queue, memory, batch, result, signal_used)
        return more, batch.deferred, batch.wait_ns

    def finish_batch(self, queue: VirtQueue, memory: MemoryAccess, batch: Batch,
                     result: BatchResult | None, signal_used: Callable[[int], None]) -> bool:
        """Return a processed batch to the used ring and interrupt the driver, then raise
        the batch's protocol error if it had one. True if more chains may be waiting
        (a full batch, or one added while notifications were off): keep draining."""
        if result is not None:
            self.complete_batch(queue, memory, result)
            if result.completions:
                signal_used(0)
            if result.error is not None:
                raise result.error
        elif batch.error is not None:
            raise batch.error
        if batch.deferred is not None or len(batch.chains) >= QUEUE_SIZE:
            return True  # a full batch: more may be waiting, keep notifications off
        # Re-arm, then look again: a chain added in between was not notified.
        return queue.enable_notifications(memory)

    def take_batch(self, queue: VirtQueue, memory: MemoryAccess,
                   deferred: DescriptorChain | None = None) -> Batch:
        """Pop every available chain (at most a queue's worth), ``deferred`` (a chain
        held from the last batch) first. A QueueError after some chains were popped is
        kept for after they are done. With a :attr:`throttle`, the first chain it
        refuses ends the batch as ``batch.deferred``."""
        chains: list[DescriptorChain] = []
        throttle = self.throttle
        try:
            if throttle is None:
                if deferred is not None:
                    chains.append(deferred)
                while len(chains) < QUEUE_SIZE and (chain := queue.pop(memory)) is not None:
                    chains.append(chain)
            else:
                admit = throttle.admit
                while len(chains) < QUEUE_SIZE:
                    if deferred is not None:
                        next_chain, deferred = deferred, None
                    elif (next_chain := queue.pop(memory)) is None:
                        break
                    wait = admit(request_bytes(next_chain))
                    if wait:
                        return Batch(chains, deferred=next_chain, wait_ns=wait)
                    chains.append(next_chain)
        except DeviceNeedsReset as e:
            return Batch(chains, e)
        return Batch(chains)

    def complete_batch(self, queue: VirtQueue, memory: MemoryAccess,
                       result: BatchResult) -> None:
        """Return a processed batch to the used ring (the caller signals the driver)."""
        for head, written in result.completions:
            queue.push(memory, head, written)

    def process_batch(self, memory: MemoryAccess, batch: Batch) -> BatchResult:
        """Do a batch's requests in ring order: all its blocking file I/O, in the calling
        thread (run() calls it in its I/O thread, or a worker thread). Never raises for a
        request's own failure; a malformed chain ends the batch with ``result.error``."""
        self.stats.batches += 1
        done: list[_Done] = []
        error = batch.error
        for chain in batch.chains:
            try:
                done.append(self._handle(memory, chain))
            except DeviceNeedsReset as e:
                error = e
                break
            except GuestMemoryError as e:
                error = DeviceNeedsReset(
                    f"{self.name}: request {chain.head} points outside guest memory: {e}"
                )
                error.__cause__ = e
                break
        self.stats.batched_requests += len(done)
        if not self.writeback and any(d.modified and d.status == _OK for d in done):
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                self._report_os_error("writethrough fdatasync", e)
                for d in done:
                    if d.modified and d.status == _OK:
                        d.status = _IOERR
                        self.stats.io_errors += 1
        for d in done:
            d.status_byte[0] = d.status
        # After the writes (see avmm.migration.dirty): a running migration sends them.
        dirty = memory.dirty
        if dirty is not None:
            for d in done:
                dirty.mark(d.status_address, 1)
        return BatchResult([(d.head, d.written) for d in done], error)

    # -- one request --------------------------------------------------------------------

    def _handle(self, memory: MemoryAccess, chain: DescriptorChain) -> _Done:
        readable_length = chain.readable_length
        writable_length = chain.writable_length
        if readable_length < REQUEST_HEADER.size:
            raise DeviceNeedsReset(
                f"{self.name}: request {chain.head} has {readable_length} device-readable "
                f"bytes, fewer than the {REQUEST_HEADER.size}-byte request header"
            )
        if writable_length < 1:
            raise DeviceNeedsReset(
                f"{self.name}: request {chain.head} has no device-writable byte for its status"
            )
        first = chain.readable[0]
        if first.length >= REQUEST_HEADER.size:
            header = memory.view(first.address, REQUEST_HEADER.size)
        else:
            header = memoryview(chain.read(memory, 0, REQUEST_HEADER.size))
        request_type, _reserved, sector = REQUEST_HEADER.unpack(header)
        status_address, status_byte = _last_byte(memory, chain.writable)
        stats = self.stats
        modified = False
        written = 0

        if request_type == _IN:
            stats.reads += 1
            length = writable_length - 1
            status = self._check_range(sector, length)
            if status is _OK:
                views = _views(memory, chain.writable, 0, length)
                status, written = self._transfer("read", os.preadv, views, sector, length)
                stats.bytes_read += written
                # Whatever preadv placed, even short of a failure, is in guest RAM.
                _mark_written(memory, chain.writable, length)
        elif request_type == _OUT:
            stats.writes += 1
            length = readable_length - REQUEST_HEADER.size
            status = self._refuse_read_only() or self._check_range(sector, length)
            if status is _OK:
                views = _views(memory, chain.readable, REQUEST_HEADER.size, length)
                status, count = self._transfer("write", os.pwritev, views, sector, length)
                stats.bytes_written += count
                modified = True
        elif request_type == _FLUSH:
            stats.flushes += 1
            status = self._flush()
        elif request_type == _GET_ID:
            stats.get_ids += 1
            identity = self.serial.encode("ascii").ljust(ID_BYTES, b"\0")
            length = min(ID_BYTES, writable_length - 1)
            offset = 0
            for view in _views(memory, chain.writable, 0, length):
                view[:] = identity[offset:offset + len(view)]
                offset += len(view)
            _mark_written(memory, chain.writable, length)
            written = length
            status = _OK
        elif request_type in (_DISCARD, _WRITE_ZEROES):
            discard = request_type == _DISCARD
            if discard:
                stats.discards += 1
            else:
                stats.write_zeroes += 1
            status = self._refuse_read_only() or self._segments(memory, chain, discard=discard)
            modified = True
        else:
            stats.unsupported += 1
            status = _UNSUPP
        # The used length: the data written and the status byte. Except after a read
        # that failed part-way: len promises that many bytes were written from the start
        # of the writable part (virtio 1.2 §2.7.8.2; an underestimate is allowed, an
        # overestimate is not), and the status byte lies past the bytes that were never
        # read, so only the data that was read counts.
        used = written if 0 < written < writable_length - 1 and request_type == _IN \
            else written + 1
        return _Done(chain.head, used, status_byte, status_address, status, modified)

    def _refuse_read_only(self) -> Status | None:
        if self.read_only:
            self.stats.rejected += 1
            return _IOERR
        return None

    def _check_range(self, sector: int, length: int) -> Status:
        """IOERR unless ``length`` bytes at ``sector`` are whole sectors on the disk."""
        if length % SECTOR_SIZE or sector > self.capacity - (length >> SECTOR_SHIFT):
            self.stats.rejected += 1
            return _IOERR
        return _OK

    def _transfer(self, what: str, call: Callable[[int, list[memoryview], int], int],
                  views: list[memoryview], sector: int, length: int) -> tuple[Status, int]:
        """preadv/pwritev ``views`` at ``sector`` until all ``length`` bytes moved.
        Returns the status and the bytes actually moved."""
        offset = sector << SECTOR_SHIFT
        done = 0
        index = 0
        try:
            while index < len(views):
                buffers = (views if not index and len(views) <= IOV_MAX
                           else views[index:index + IOV_MAX])
                count = call(self.fd, buffers, offset + done)
                if count <= 0:
                    # End of file: the image shrank under us since we measured it.
                    raise OSError(errno.EIO, f"unexpected end of file at {offset + done}")
                done += count
                if done == length:
                    break  # the usual case: all of it in one call
                while count and index < len(views):
                    size = len(views[index])
                    if count >= size:
                        count -= size
                        index += 1
                    else:
                        views[index] = views[index][count:]
                        count = 0
        except OSError as e:
            self._report_os_error(what, e)
            self.stats.io_errors += 1
            return _IOERR, done
        assert done == length
        return _OK, done

    def _flush(self) -> Status:
        if self.read_only:
            return _OK  # nothing of ours to make stable
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self._report_os_error("flush", e)
            self.stats.io_errors += 1
            return _IOERR
        return _OK

    def _segments(self, memory: MemoryAccess, chain: DescriptorChain, *,
                  discard: bool) -> Status:
        """DISCARD / WRITE_ZEROES: check every segment first, then apply them in order."""
        length = chain.readable_length - REQUEST_HEADER.size
        max_segments = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        count, rest = divmod(length, SEGMENT.size)
        if rest or count > max_segments:
            self.stats.rejected += 1
            return _IOERR
        data = chain.read(memory, REQUEST_HEADER.size, length)
        segments = [SEGMENT.unpack_from(data, i * SEGMENT.size) for i in range(count)]
        for sector, sectors, flags in segments:
            # §5.2.6.2: unknown flags, and unmap on a discard, are UNSUPP.
            if flags & ~SEGMENT_FLAG_UNMAP or (discard and flags):
                self.stats.unsupported += 1
                return _UNSUPP
            if sectors > max_sectors or sector > self.capacity - sectors:
                self.stats.rejected += 1
                return _IOERR
        what = "discard" if discard else "write zeroes"
        try:
            for sector, sectors, flags in segments:
                offset, size = sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT
                if discard:
                    self._discard(offset, size)
                    self.stats.bytes_discarded += size
                else:
                    self._zero(offset, size, unmap=bool(flags & SEGMENT_FLAG_UNMAP))
                    self.stats.bytes_zeroed += size
        except OSError as e:
            self._report_os_error(what, e)
            self.stats.io_errors += 1
            return _IOERR
        return _OK

    def _discard(self, offset: int, size: int) -> None:
        # A discard MAY deallocate (§5.2.6.2): where holes cannot be punched it does
        # nothing, rather than cost a write of every discarded byte. Reading a discarded
        # range then returns the old data, which the spec allows (WRITE_ZEROES is the
        # request that promises zeroes).
        if size:
            self._punch(offset, size)

    def _zero(self, offset: int, size: int, *, unmap: bool) -> None:
        if not size:
            return
        if unmap and self._punch(offset, size):
            return
        if self.can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, size)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self.can_zero_range = False
        self._write_zeroes(offset, size)

    def _punch(self, offset: int, size: int) -> bool:
        """Deallocate a range (reads then return zeroes); False where not supported."""
        if not self.can_punch_holes:
            return False
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            self.can_punch_holes = False
            log.info("file system cannot punch holes; discard does nothing",
                     device=self.name, path=str(self.path))
            return False
        return True

    def _write_zeroes(self, offset: int, size: int) -> None:
        end = offset + size
        while offset < end:
            count = os.pwrite(self.fd, memoryview(_ZEROES)[:min(len(_ZEROES), end - offset)],
                              offset)
            if count <= 0:
                raise OSError(errno.EIO, f"short write at {offset}")
            offset += count

    def _report_os_error(self, operation: str, error: OSError) -> None:
        code = error.errno or 0
        if (operation, code) in self.reported_errors:
            return
        self.reported_errors.add((operation, code))
        log.error("disk I/O failed; the guest sees IOERR (logged once per kind)",
                  device=self.name, path=str(self.path), operation=operation,
                  errno=errno.errorcode.get(code, str(code)), error=str(error))


def request_bytes(chain: DescriptorChain) -> int:
    """What a request costs the bandwidth bucket: its data bytes, read past the header
    or written before the status byte (a FLUSH costs 0, a GET_ID its 20 bytes)."""
    return (max(chain.readable_length - REQUEST_HEADER.size, 0)
            + max(chain.writable_length - 1, 0))


def _views(memory: MemoryAccess, buffers: Sequence[Buffer], skip: int,
           length: int) -> list[memoryview]:
    """Memoryviews of ``length`` bytes of ``buffers`` after the first ``skip`` bytes."""
    views = []
    for address, size in buffers:
        if skip >= size:
            skip -= size
            continue
        take = min(size - skip, length)
        if take:
            views.append(memory.view(address + skip, take))
            length -= take
        skip = 0
        if not length:
            break
    return views


def _mark_written(memory: MemoryAccess, buffers: Sequence[Buffer], length: int) -> None:
    """Mark the first ``length`` bytes of ``buffers`` dirty, while a migration runs."""
    dirty = memory.dirty
    if dirty is None:
        return
    for address, size in buffers:
        if length <= 0:
            break
        take = min(size, length)
        dirty.mark(address, take)
        length -= take


def _last_byte(memory: MemoryAccess, buffers: Sequence[Buffer]) -> tuple[int, memoryview]:
    for address, size in reversed(buffers):
        if size:
            return address + size - 1, memory.view(address + size - 1, 1)
    raise AssertionError("caller checked that a writable byte exists")
