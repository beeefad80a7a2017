"""avmm as a vhost-user front-end: a virtio device whose data path is another process.

:class:`VhostUserDevice` is a :class:`~avmm.virtio.device.VirtioDevice` that the usual
:class:`~avmm.virtio.mmio.MmioTransport` wraps, so register handling is exactly that of
an in-process device. What differs is where the queues are served:

* **Construction** (VM build, synchronous, on a blocking socket with a timeout):
  connect, SET_OWNER, GET_FEATURES, and when the back-end offers
  VHOST_USER_F_PROTOCOL_FEATURES (bit 30) GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG
  and MQ are acked where offered), GET_QUEUE_NUM (MQ) and GET_CONFIG (CONFIG; the
  config space is cached and served to the driver from the cache). Any failure is a
  :class:`VhostFrontendError`, which the VM turns into a ``VmStartError``. What the
  driver is offered is what avmm can carry: vhost-only and transport bits the
  virtio-mmio transport lacks are masked, a NIC gets no control queue, and a disk
  neither CONFIG_WCE (config writes are not relayed) nor SECURE_ERASE/ZONED (their
  config fields are not fetched). A disk has one queue unless the back-end offers
  PROTOCOL_F_MQ and VIRTIO_BLK_F_MQ; then as many as GET_QUEUE_NUM and its config
  allow (or as configured), and num_queues in the config space the driver reads is
  rewritten to that count (a driver creates as many queues as it reads there).
* **run()** (the driver set DRIVER_OK): SET_FEATURES, SET_MEM_TABLE (avmm's RAM is one
  shared memfd: each region goes with that fd and its offset), and per ring the driver
  enabled SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (avmm's own virtual addresses
  of the rings), SET_VRING_CALL (the slot's irqfd eventfd), SET_VRING_ERR (an eventfd
  of the device's own per ring), SET_VRING_KICK (the ring's KVM ioeventfd eventfd) and
  SET_VRING_ENABLE. From then on kicks go from KVM straight to the back-end and
  interrupts from the back-end straight to KVM: the data path never enters avmm.
  ``run`` then only watches the connection and the error eventfds.
* **Ring errors.** A back-end that finds a ring broken (a driver's looping or
  out-of-RAM chain) signals that ring's error eventfd: ``run`` raises
  DeviceNeedsReset, so the device goes to DEVICE_NEEDS_RESET with a configuration
  change interrupt (virtio 1.2 §2.1.2) exactly as an in-process device does, and the
  rings are stopped (GET_VRING_BASE), which also stops the back-end's device. The
  connection stays; the driver's reset and next DRIVER_OK start the rings again.
* **Stop** (driver reset, VM stop: ``run`` is cancelled): GET_VRING_BASE per ring stops
  it; the returned index goes back into the queue's state. A back-end that does not
  answer within :data:`RING_TIMEOUT_S` is dropped, but its connection is only shut
  down for writing and kept until the back-end closes its side: until then
  :attr:`VhostUserDevice.stop_unconfirmed` says why it may still write guest memory,
  and the slot keeps the driver's reset pending (Status reads non-zero, virtio 1.2
  §2.4.1). A VM stop does not wait for it.

Because the back-end signals the irqfd itself, the transport never sees a used buffer
notification: the slot builds the transport with ``external_used_notifications`` (see
:mod:`avmm.virtio.mmio`) so InterruptStatus reports USED_BUFFER while the device runs.

Reconnect. A back-end that breaks the protocol or goes away while the rings were
running is *lost*, not fatal: the device stalls (kicks pile up in the ioeventfd, the
guest's requests wait; no DEVICE_NEEDS_RESET) and ``run`` reconnects to the same socket
path with exponential backoff (:data:`RECONNECT_FIRST_DELAY_S` doubling up to
:data:`RECONNECT_MAX_DELAY_S`, for at most ``reconnect_timeout`` seconds in all, default
:data:`RECONNECT_TIMEOUT_S`; then DEVICE_NEEDS_RESET). Each attempt redoes the handshake,
checks that the back-end still offers every feature the driver negotiated, the queue
count and (blk) the same config space (else DEVICE_NEEDS_RESET at once), and replays the
whole ring bring-up. The give-up time is checked between attempts, so the stall lasts at
most ``reconnect_timeout`` plus one handshake timeout. A back-end that fails in the first
bring-up after DRIVER_OK before any ring had its kick fd (SET_VRING_KICK), or that does
not answer it in time, is broken rather than restarted: DEVICE_NEEDS_RESET at once. With
REPLY_ACK, once every message before the first SET_VRING_KICK was acked, the back-end may
run that ring before the bring-up is confirmed (qemu-storage-daemon takes the guest's
requests as soon as it has the kick fd), so a connection lost from then on is a crash
like any other: reconnect. (Without acks nothing tells the two apart: needs reset.)

Inflight tracking (INFLIGHT_SHMFD, acked where offered). At the first bring-up
GET_INFLIGHT_FD(num_queues, queue_size) gives a memfd in which the back-end records which
descriptor chains it has taken and not yet returned. The device object, not the
connection, keeps that fd (with its size and offset) and hands it back with
SET_INFLIGHT_FD before the rings on every bring-up; a driver reset forgets it (the rings
start afresh, so must the record).

Snapshots (issue 12). :meth:`VhostUserDevice.save_state` returns a
:class:`VhostUserFrontendState`: the features the back-end offered, the driver was
offered and the front-end last set, the protocol features, the queue count and sizes,
the config space the driver reads, the inflight record's bytes (INFLIGHT_SHMFD) and the
back-end's own device state (VHOST_USER_PROTOCOL_F_DEVICE_STATE, acked where offered;
None otherwise, e.g. qemu-storage-daemon). Ring addresses and positions are the
transport's queue state, and nothing names the socket, so a restore may use another.

* Save. The back-end's state can only be taken while its rings are stopped and the
  connection is up, so it is taken on the way down: when ``run`` is cancelled (the
  slot's ``pause()``, a driver reset, a VM stop) the rings are stopped with
  GET_VRING_BASE (their positions go into the queue state) and then, with DEVICE_STATE,
  :meth:`VhostUserDevice.fetch_device_state` runs SET_DEVICE_STATE_FD (save) with the
  write end of a pipe, reads to end-of-file (at most
  :data:`~avmm.vhost.device_state.MAX_DEVICE_STATE_SIZE` bytes) and asks
  CHECK_DEVICE_STATE, all within :data:`STATE_TIMEOUT_S` and without blocking the event
  loop. The bytes are kept for ``save_state``, which a VM calls while paused and which
  needs no I/O. A back-end that refuses is kept (``save_state`` then raises
  DeviceStateError with its answer); one that hangs, floods the pipe or answers out of
  step is dropped (its rings are already stopped) and the next ``run`` reconnects with
  the exact ring positions GET_VRING_BASE gave. Starting the rings again makes the
  kept state stale: ``save_state`` refuses it until the next stop.
* Restore. The VM builds the device as usual (connect and handshake to the socket its
  config names now), then calls ``restore_state`` before the device task starts. It
  checks that this back-end offers every feature and protocol feature the snapshot
  negotiated, the same queue count and sizes and (blk) the same config space, and
  refuses with one DeviceStateError line otherwise; then, with a saved back-end state,
  runs SET_DEVICE_STATE_FD (load), writes the bytes into the pipe, closes it and asks
  CHECK_DEVICE_STATE (on the blocking socket, like the handshake: at most
  :data:`STATE_TIMEOUT_S`). A saved inflight record is re-created in a sealed memfd and
  handed over with SET_INFLIGHT_FD at the first bring-up. The first ``run`` then starts
  the rings with SET_VRING_BASE from the restored queue state (the positions
  GET_VRING_BASE gave at the save), not from the used ring.

Dirty logging (live migration, issue 13). A back-end that offers VHOST_F_LOG_ALL and
VHOST_USER_PROTOCOL_F_LOG_SHMFD (acked where offered) can log its writes to guest
memory: :attr:`VhostUserDevice.can_log_dirty`, and :meth:`~VhostUserDevice.dirty_log_problem`
says in one line why not (the migration refuses such a VM up front).
:meth:`~VhostUserDevice.start_dirty_log` creates the log (:mod:`avmm.vhost.dirty_log`:
a sealed memfd, one bit per 4 KiB page of guest physical address space) and, where the
rings run, has the device task send SET_LOG_BASE (answered by the back-end),
SET_FEATURES with VHOST_F_LOG_ALL and SET_VRING_ADDR with VHOST_VRING_F_LOG and the used
ring's guest address per ring; it returns once the back-end has them, so no write after
it escapes the log. The device task owns the connection, so a change of settings wakes
its watch, which applies them between two watches; every bring-up (resume after a
pause, reconnect) applies the settings as they are. :meth:`~VhostUserDevice.collect_dirty`
reads and clears the log in place, word by word with an atomic exchange (no message, any
thread), and numbers the pages as the guest RAM file does, through the memory region
table. :meth:`~VhostUserDevice.stop_dirty_log` sends the settings without logging and
frees the log. A back-end that comes back from a reconnect without logging makes
``collect_dirty`` refuse (the migration then fails and the VM runs on).

Ring base after a reconnect (no GET_VRING_BASE is possible: the old back-end is gone;
where the rings had been stopped with GET_VRING_BASE before the connection went, the
queue state's positions are exact and are used instead). SET_VRING_BASE gets the
``idx`` of the used ring, read from guest memory: the number of chains the driver has
been given back. With INFLIGHT_SHMFD the back-end does not trust
that value blindly: it reconciles its record with the used ring (a chain whose used
entry was published just before the crash is no longer in flight), resubmits the chains
still marked in flight, oldest first, and continues taking new chains from used idx +
(number in flight), i.e. exactly after the last chain the old back-end took. Every
request the driver made is therefore completed exactly once: none is lost (in-flight
ones are redone; a block write redone with the same data is harmless because the guest
cannot touch the buffer until it is returned) and none is returned twice (completed ones
are in the used ring and are not in flight). Without INFLIGHT_SHMFD used idx is the only
safe guess and is exact only for a back-end that completes chains in order (chains taken
but not completed are then read again from the available ring); one that completes out
of order may return a chain twice or never, so such back-ends need INFLIGHT_SHMFD.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import trio

from ..devices._state import DeviceStateError, check_state_class
from ..errors import AvmmError
from ..eventfd import wait_eventfd
from ..state._widths import U16, U32, U64
from ..virtio.device import (
    VIRTIO_F_VERSION_1,
    DeviceContext,
    DeviceId,
    DeviceNeedsReset,
    VirtioDevice,
)
from .device_state import MAX_DEVICE_STATE_SIZE
from .dirty_log import FrontendLog
from .protocol import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_PHASE_STOPPED,
    DEVICE_STATE_SAVE,
    MAX_CONFIG_SIZE,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    Message,
    ProtocolFeature,
    Request,
    VhostConnectionClosed,
    VhostProtocolError,
    receive_message,
    send_message,
)

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..migration.dirty import PageSet

log = structlog.get_logger(__name__)

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "VhostFrontendError",
    "VhostUserDevice",
    "VhostUserFrontendState",
    "VhostUserInflightState",
]

#: How long the connection and each step of the handshake may take.
HANDSHAKE_TIMEOUT_S = 5.0
#: How long bringing the rings up (or stopping them) may take once the driver is ready.
RING_TIMEOUT_S = 5.0
#: How many connections whose back-end may still run rings are kept to learn when it
#: stops (see :attr:`VhostUserDevice.stop_unconfirmed`); past it the oldest is given up.
MAX_LINGERING = 8
#: Reconnect backoff: the first wait, doubling up to the largest, for at most the total.
RECONNECT_FIRST_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 1.0
RECONNECT_TIMEOUT_S = 30.0
#: How long a device state transfer (SET_DEVICE_STATE_FD to CHECK_DEVICE_STATE's
#: answer) may take, either way.
STATE_TIMEOUT_S = 5.0
#: How long start_dirty_log/stop_dirty_log wait for the device task to hand the log
#: settings to a back-end whose rings run (or are being brought up).
LOG_SYNC_TIMEOUT_S = 3 * RING_TIMEOUT_S
#: The largest inflight record a snapshot keeps (256 queues of 1024 entries fit).
MAX_INFLIGHT_STATE = 8 << 20
#: Seals of an inflight area re-created at a restore (as the back-end seals its own).
_INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

#: Protocol features this front-end acks where the back-end offers them.
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD) | (1 << ProtocolFeature.DEVICE_STATE)
    | (1 << ProtocolFeature.LOG_SHMFD)
)
#: Protocol features a restore does not need the new back-end to offer: they change
#: nothing in the state a snapshot carries (the dirty log is for the source's rounds).
_RESTORE_OPTIONAL = 1 << ProtocolFeature.LOG_SHMFD

#: Virtio feature bits the virtio-mmio transport cannot pass through: VHOST_F_LOG_ALL (26,
#: vhost only), PROTOCOL_FEATURES (30, vhost only), ACCESS_PLATFORM (33), RING_PACKED
#: (34), SR_IOV (37), NOTIFICATION_DATA (38), NOTIF_CONFIG_DATA (39), RING_RESET (40) and
#: everything above.
_TRANSPORT_UNSUPPORTED = ((1 << 26) | (1 << 30) | (1 << 33) | (1 << 34) | (1 << 37)
                          | (1 << 38) | (1 << 39) | ~((1 << 40) - 1))
#: virtio-net: the control queue and what needs it (CTRL_VQ 17, CTRL_RX 18, CTRL_VLAN 19,
#: GUEST_ANNOUNCE 21, MQ 22, CTRL_MAC_ADDR 23): avmm gives a NIC one rx/tx pair only.
_NET_UNSUPPORTED = (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21) | (1 << 22) | (1 << 23)
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_MQ = 1 << 12
#: The device-specific feature bits (0 to 23) of virtio-blk that pass through: SIZE_MAX 1,
#: SEG_MAX 2, GEOMETRY 4, RO 5, BLK_SIZE 6, FLUSH 9, TOPOLOGY 10, MQ 12 (see below),
#: DISCARD 13, WRITE_ZEROES 14, LIFETIME 15. Not CONFIG_WCE (11: the driver's writeback
#: setting is a config write, which is not relayed), SECURE_ERASE (16) and ZONED (17),
#: whose config fields lie past the part fetched, nor legacy or unknown bits.
_BLK_CARRIED = ((1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10)
                | VIRTIO_BLK_F_MQ | (1 << 13) | (1 << 14) | (1 << 15))
_BLK_UNSUPPORTED = ((1 << 24) - 1) & ~_BLK_CARRIED
#: Where virtio-blk's config space holds num_queues (u16).
_BLK_NUM_QUEUES = 34

#: Config space sizes asked with GET_CONFIG, by device ID (back-ends such as
#: libvhost-user's refuse a read past their config structure).
CONFIG_SIZES = {
    DeviceId.NET: 12,  # mac, status, max_virtqueue_pairs, mtu
    DeviceId.BLOCK: 60,  # up to write_zeroes_may_unmap (virtio 1.1)
    DeviceId.CONSOLE: 12,
    19: 8,  # vsock: guest_cid
    26: 40,  # fs: tag[36], num_request_queues
}


class VhostFrontendError(AvmmError):
    """The vhost-user back-end could not be reached or broke the protocol."""


class _Incompatible(Exception):
    """A reconnected back-end no longer offers what the driver relies on."""


class _Refused(VhostProtocolError):
    """The back-end answered a REPLY_ACK with failure."""


@dataclass
class InflightArea:
    """The back-end's inflight record (INFLIGHT_SHMFD): kept across reconnects."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def payload(self) -> dict[str, int]:
        return {"mmap_size": self.mmap_size, "mmap_offset": self.mmap_offset,
                "num_queues": self.num_queues, "queue_size": self.queue_size}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class VhostUserInflightState:
    """The back-end's inflight record (INFLIGHT_SHMFD) as saved: its bytes."""

    STATE_VERSION: ClassVar[int] = 1

    num_queues: U16
    queue_size: U16
    contents: bytes


@dataclass(frozen=True, slots=True)
class VhostUserFrontendState:
    """A vhost-user device's front-end state (see the module docstring, "Snapshots").

    Ring addresses and positions are not here: they are the transport's queue state.
    Nothing names the socket, so a restore may connect to another one."""

    STATE_VERSION: ClassVar[int] = 1

    device_id: U32
    #: What the back-end offered (GET_FEATURES), what the driver was offered (after
    #: masking), and what the front-end last set (SET_FEATURES; 0: never).
    backend_features: U64
    offered_features: U64
    acked_features: U64
    #: The protocol features negotiated (SET_PROTOCOL_FEATURES).
    protocol_features: U64
    #: The maximum size of each queue: their count is the device's queue count.
    queue_sizes: list[U16]
    #: The config space the driver reads.
    config: bytes
    inflight: VhostUserInflightState | None
    #: The back-end's own state (DEVICE_STATE), None where it has none to give.
    backend_state: bytes | None


class _BlockingSocket:
    """A blocking stdlib socket behind the awaitable interface ``send_message`` and
    ``receive_message`` use; :func:`_run_sync` drives them without an event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def sendmsg(self, buffers: Any, ancillary: Any) -> int:
        return self._sock.sendmsg(buffers, ancillary)

    async def recvmsg(self, size: int, ancillary_size: int, flags: int) -> Any:
        return self._sock.recvmsg(size, ancillary_size, flags)


def _run_sync(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (it only awaits :class:`_BlockingSocket`)."""
    try:
        coroutine.send(None)
    except StopIteration as e:
        return e.value
    coroutine.close()
    raise RuntimeError("a blocking vhost-user exchange tried to suspend")


class VhostUserDevice(VirtioDevice):
    """A virtio device served by the vhost-user back-end at ``socket_path`` (see the
    module docstring).

    ``num_queues``: how many queues the driver sees (None: the back-end's
    GET_QUEUE_NUM with MQ, else 1; 2 for a NIC). ``mac`` (NICs only) replaces the
    back-end's address in the config space and offers VIRTIO_NET_F_MAC.
    """

    #: The slot builds the transport to suit: no COMMON_FEATURES of its own (the
    #: back-end's features are offered as they are) and USED_BUFFER in InterruptStatus.
    external_data_path = True

    def __init__(self, socket_path: str | os.PathLike[str], *, device_id: int,
                 memory: GuestMemory, num_queues: int | None = None,
                 queue_size: int = 256, mac: bytes | None = None, name: str = "vhost0",
                 timeout: float | None = None, reconnect_timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.name = name
        self.memory = memory
        self._log = log.bind(device=name, socket=str(self.socket_path))
        try:
            self.device_id = DeviceId(device_id)
        except ValueError:
            self.device_id = device_id  # type: ignore[assignment]
        self.timeout = HANDSHAKE_TIMEOUT_S if timeout is None else timeout
        #: None: :data:`RECONNECT_TIMEOUT_S` as it is when a reconnect starts.
        self.reconnect_timeout = reconnect_timeout
        #: The inflight record (INFLIGHT_SHMFD), kept across reconnects.
        self.inflight: InflightArea | None = None
        #: Reconnects that succeeded, and how long the last one took (s).
        self.reconnects = 0
        self.last_reconnect_s: float | None = None
        #: Negotiated state (plain values, for snapshots and logs).
        self.backend_features = 0
        self.protocol_features = 0
        self.backend_queue_num: int | None = None
        self.config = b""
        #: The config space as the back-end gave it (``config`` is what the driver sees).
        self._backend_config = b""
        self.connected = False
        self._features = 0
        self._sock: socket.socket | None = None
        self._trio_sock: Any = None
        self._started: list[int] = []
        #: Each ring's error eventfd (SET_VRING_ERR), created at its first bring-up and
        #: kept across reconnects and resets.
        self._err_fds: dict[int, int] = {}
        # Connections closed on our side while the back-end may still run rings on them
        # (see stop_unconfirmed); any thread reads them, so they have a lock.
        self._lingering: list[socket.socket] = []
        self._linger_lock = threading.Lock()
        self._linger_reason = ""
        self._given_up: str | None = None
        #: The virtio features of the last SET_FEATURES (0: the rings never ran).
        self._acked_features = 0
        #: The queue state holds the back-end's exact ring positions (its rings were
        #: stopped with GET_VRING_BASE and not started since).
        self._bases_exact = False
        #: The bring-up under way has handed over a ring's kick fd: from then on the
        #: back-end may have run that ring, so a loss is a crash to reconnect from.
        self._kick_sent = False
        #: The back-end's device state (DEVICE_STATE) as of its last stop, or as loaded
        #: at a restore; valid only while the rings have not run since. None and valid:
        #: the back-end has had nothing worth saving yet.
        self._backend_state: bytes | None = None
        self._backend_state_valid = True
        self._backend_state_error: str | None = None
        # Dirty logging (see "Dirty logging" in the module docstring). The settings
        # wanted change with a new generation; the device task applies them and
        # records the generation applied.
        self._dirty: FrontendLog | None = None
        self._dirty_error: str | None = None
        self._log_generation = 0
        self._log_applied = 0
        self._log_refused: str | None = None
        self._log_wake: trio.Event | None = None
        self._log_progress = trio.Event()
        #: The device task runs (from the start of run() to its end).
        self._task_active = False
        self._connect_and_negotiate(num_queues, queue_size, mac)

    # -- construction: the blocking handshake -------------------------------------------

    def _connect_and_negotiate(self, num_queues: int | None, queue_size: int,
                               mac: bytes | None) -> None:
        where = f"vhost-user back-end at {self.socket_path}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        self._sock = sock
        try:
            try:
                sock.connect(os.fspath(self.socket_path))
            except OSError as e:
                raise VhostFrontendError(f"cannot connect to the {where}: "
                                         f"{e.strerror or e}") from e
            self.connected = True
            self._handshake(num_queues, queue_size, mac)
        except VhostFrontendError:
            self.close()
            raise
        except TimeoutError as e:
            self.close()
            raise VhostFrontendError(f"the {where} did not answer within "
                                     f"{self.timeout:g} s") from e
        except (VhostProtocolError, OSError) as e:
            self.close()
            raise VhostFrontendError(f"the {where} broke the protocol: {e}") from e
        self._log.info("vhost-user back-end connected", features=hex(self.backend_features),
                       protocol_features=hex(self.protocol_features),
                       queues=len(self.queue_max_sizes))

    def _request(self, request: Request, payload: Any = None, *, fds: Sequence[int] = (),
                 reply: bool = False, need_reply: bool = False) -> Any:
        assert self._sock is not None
        blocking = _BlockingSocket(self._sock)
        _run_sync(send_message(blocking, Message(request, payload, need_reply=need_reply), fds))
        if not (reply or need_reply):
            return None
        answer = _run_sync(receive_message(blocking))
        return _check_reply(request, answer, need_reply and not reply)

    def _handshake(self, num_queues: int | None, queue_size: int, mac: bytes | None) -> None:
        self._request(Request.SET_OWNER)
        features = self._request(Request.GET_FEATURES, reply=True)
        self.backend_features = features
        if not features & VIRTIO_F_VERSION_1:
            raise VhostFrontendError(
                f"the vhost-user back-end at {self.socket_path} does not offer "
                f"VIRTIO_F_VERSION_1 (features 0x{features:x}); virtio-mmio needs it")
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            offered = self._request(Request.GET_PROTOCOL_FEATURES, reply=True)
            self.protocol_features = offered & SUPPORTED_PROTOCOL_FEATURES
            self._request(Request.SET_PROTOCOL_FEATURES, self.protocol_features,
                          need_reply=self._has(ProtocolFeature.REPLY_ACK))
            if self._has(ProtocolFeature.MQ):
                count = self._request(Request.GET_QUEUE_NUM, reply=True)
                if not 1 <= count <= 256:
                    raise VhostProtocolError(f"GET_QUEUE_NUM answered {count}")
                self.backend_queue_num = count
            size = CONFIG_SIZES.get(int(self.device_id), 0)
            if self._has(ProtocolFeature.CONFIG) and size:
                answer = self._request(Request.GET_CONFIG,
                                       {"offset": 0, "size": size, "flags": 0,
                                        "payload": bytes(size)}, reply=True)
                if answer.offset != 0 or answer.size != size:
                    raise VhostProtocolError(
                        f"GET_CONFIG for {size} bytes at 0 answered {answer.size} bytes "
                        f"at {answer.offset}")
                self.config = self._backend_config = bytes(answer.payload)
        offered = features & ~_TRANSPORT_UNSUPPORTED
        if self.device_id == DeviceId.BLOCK and offered & VIRTIO_BLK_F_SIZE_MAX \
                and self.config[8:12] == bytes(4):
            # qemu-storage-daemon offers SIZE_MAX with size_max = 0, which a driver may
            # take literally (no segment can hold a byte); without the bit it means "no
            # limit", which is what the back-end meant.
            offered &= ~VIRTIO_BLK_F_SIZE_MAX
        if self.device_id == DeviceId.NET:
            offered &= ~_NET_UNSUPPORTED
            if mac is not None:
                self.config = bytes(mac) + self.config[6:]
                offered |= VIRTIO_NET_F_MAC
        if self.device_id == DeviceId.BLOCK:
            offered, num_queues = self._block_queues(offered, num_queues)
        elif num_queues is None:
            if self.device_id == DeviceId.NET:
                num_queues = 2
            elif self.backend_queue_num is not None:
                num_queues = self.backend_queue_num
            else:
                num_queues = 1
        if self.backend_queue_num is not None and self.device_id != DeviceId.NET \
                and num_queues > self.backend_queue_num:
            raise VhostFrontendError(
                f"{num_queues} queues configured, the vhost-user back-end at "
                f"{self.socket_path} has {self.backend_queue_num}")
        self._features = offered
        self.queue_max_sizes = (queue_size,) * num_queues

    def _block_queues(self, offered: int, num_queues: int | None) -> tuple[int, int]:
        """virtio-blk: the features offered and the number of queues. Features the
        front-end cannot carry are masked. Without PROTOCOL_F_MQ the back-end serves one
        queue (vhost-user spec), so VIRTIO_BLK_F_MQ is masked whatever its config says;
        with it, the driver gets the queues configured (default: as many as the
        back-end has and its config announces), and the num_queues field in the config
        space says exactly that many: a driver creates as many queues as it reads
        there, and its probe fails if one of them does not exist."""
        offered &= ~_BLK_UNSUPPORTED
        mq = offered & VIRTIO_BLK_F_MQ
        limit = (self.backend_queue_num or 1) if self._has(ProtocolFeature.MQ) else 1
        if num_queues is None:
            num_queues = 1
            if mq:
                announced = int.from_bytes(
                    self.config[_BLK_NUM_QUEUES:_BLK_NUM_QUEUES + 2], "little")
                num_queues = min(limit, announced) if announced else limit
        elif num_queues > limit:
            raise VhostFrontendError(
                f"{num_queues} queues configured, the vhost-user back-end at "
                f"{self.socket_path} serves {limit}"
                + ("" if self._has(ProtocolFeature.MQ)
                   else " (it does not offer VHOST_USER_PROTOCOL_F_MQ)"))
        if num_queues == 1:
            offered &= ~VIRTIO_BLK_F_MQ
        if len(self.config) >= _BLK_NUM_QUEUES + 2:
            config = bytearray(self.config)
            config[_BLK_NUM_QUEUES:_BLK_NUM_QUEUES + 2] = num_queues.to_bytes(2, "little")
            self.config = bytes(config)
        return offered, num_queues

    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    # -- VirtioDevice -------------------------------------------------------------------

    def device_features(self) -> int:
        return self._features

    def read_config(self, offset: int, size: int) -> bytes:
        data = self.config[offset:offset + size] if 0 <= offset < MAX_CONFIG_SIZE else b""
        return data.ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        # Writable config fields (blk's writeback) would need SET_CONFIG; not relayed yet.
        self._log.debug("config write ignored", offset=offset, size=len(data))

    async def run(self, context: DeviceContext) -> None:
        self._task_active = True
        try:
            if self.connected and self._sock is not None:
                if self._trio_sock is None:
                    self._trio_sock = trio.socket.from_stdlib_socket(self._sock)
                try:
                    with trio.CancelScope(shield=True):
                        with trio.fail_after(RING_TIMEOUT_S):
                            await self._start_rings(self._trio_sock, context, resume=False)
                except (VhostProtocolError, OSError, trio.TooSlowError) as e:
                    if not self._kick_sent or isinstance(e, trio.TooSlowError):
                        # Broken before any ring could run (or hung): not a crash to
                        # wait out.
                        self._drop(_describe(e))
                        raise DeviceNeedsReset(
                            f"vhost-user back-end at {self.socket_path}: "
                            f"{e or 'timed out'}") from e
                    # A ring had its kick fd: the back-end may have taken requests
                    # before it went away, so this is a lost back-end like any other.
                    self._log.warning("vhost-user back-end lost during the bring-up",
                                      reason=_describe(e))
                    self._drop(_describe(e), logged=True)
                    self._log_progressed()
                    await self._reconnect(context)
            else:
                await self._reconnect(context)
            while True:
                try:
                    while True:
                        if self._log_applied != self._log_generation:
                            await self._serve_log_settings(self._trio_sock, context)
                        await self._watch(self._trio_sock)
                except (VhostProtocolError, OSError) as e:
                    self._log.warning("vhost-user back-end lost", reason=_describe(e))
                    self._drop(_describe(e), logged=True)
                self._log_progressed()
                await self._reconnect(context)
        finally:
            self._task_active = False
            self._log_progressed()
            if self.connected and self._started:
                with trio.CancelScope(shield=True):
                    await self._stop_rings(self._trio_sock, context)
                    if self.connected:
                        await self.fetch_device_state()

    async def _reconnect(self, context: DeviceContext) -> None:
        """Connect again, renegotiate and restart the rings, with bounded exponential
        backoff (see the module docstring); DeviceNeedsReset when it gives up or the
        back-end that answers no longer fits the driver."""
        total = RECONNECT_TIMEOUT_S if self.reconnect_timeout is None \
            else self.reconnect_timeout
        started = trio.current_time()
        deadline = started + total
        delay = RECONNECT_FIRST_DELAY_S
        attempt = 0
        while True:
            attempt += 1
            self._log.info("reconnecting", attempt=attempt)
            try:
                with trio.fail_after(self.timeout):
                    sock = await self._connect()
                    await self._renegotiate(sock, context)
                with trio.CancelScope(shield=True):
                    with trio.fail_after(RING_TIMEOUT_S):
                        # Rings stopped cleanly (GET_VRING_BASE answered) before the
                        # connection went have exact bases in the queue state.
                        await self._start_rings(sock, context,
                                                resume=not self._bases_exact)
            except _Incompatible as e:
                self._drop(str(e))
                self._log.error("vhost-user back-end no longer fits the device",
                                reason=str(e))
                raise DeviceNeedsReset(f"vhost-user back-end at {self.socket_path}: "
                                       f"{e}") from e
            except (VhostProtocolError, OSError, trio.TooSlowError) as e:
                self._drop(_describe(e), logged=True)
                self._log.info("reconnect attempt failed", attempt=attempt,
                               reason=_describe(e))
            else:
                elapsed = trio.current_time() - started
                self.reconnects += 1
                self.last_reconnect_s = elapsed
                self._log.info("reconnected", attempt=attempt, after_s=round(elapsed, 3))
                return
            now = trio.current_time()
            if now >= deadline:
                self._log.error("vhost-user back-end did not come back; giving up",
                                attempts=attempt, after_s=round(now - started, 3))
                raise DeviceNeedsReset(
                    f"vhost-user back-end at {self.socket_path} did not come back within "
                    f"{total:g} s")
            await trio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)

    async def _connect(self) -> Any:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self._trio_sock = sock
        self.connected = True
        return sock

    async def _exchange(self, sock: Any, request: Request, payload: Any = None, *,
                        reply: bool = False, need_reply: bool = False) -> Any:
        await send_message(sock, Message(request, payload, need_reply=need_reply))
        if not (reply or need_reply):
            return None
        return _check_reply(request, await receive_message(sock), need_reply and not reply)

    async def _renegotiate(self, sock: Any, context: DeviceContext) -> None:
        """The handshake again, on a new connection, checked against what the driver
        negotiated with the old one."""
        await self._exchange(sock, Request.SET_OWNER)
        features = await self._exchange(sock, Request.GET_FEATURES, reply=True)
        needed = context.features
        if self.device_id == DeviceId.NET:
            needed &= ~VIRTIO_NET_F_MAC
        if needed & ~features:
            raise _Incompatible(f"the driver negotiated features 0x{needed & ~features:x} "
                                "that the back-end no longer offers")
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES \
                and not features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise _Incompatible("the back-end no longer offers protocol features")
        self.backend_features = features
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.protocol_features = 0
            return
        offered = await self._exchange(sock, Request.GET_PROTOCOL_FEATURES, reply=True)
        self.protocol_features = offered & SUPPORTED_PROTOCOL_FEATURES
        await self._exchange(sock, Request.SET_PROTOCOL_FEATURES, self.protocol_features,
                             need_reply=self._has(ProtocolFeature.REPLY_ACK))
        if self._has(ProtocolFeature.MQ):
            count = await self._exchange(sock, Request.GET_QUEUE_NUM, reply=True)
            if self.device_id != DeviceId.NET and count < len(self.queue_max_sizes):
                raise _Incompatible(f"the back-end now has {count} queues, the device "
                                    f"{len(self.queue_max_sizes)}")
        elif self.device_id == DeviceId.BLOCK and len(self.queue_max_sizes) > 1:
            raise _Incompatible("the back-end no longer offers VHOST_USER_PROTOCOL_F_MQ")
        size = CONFIG_SIZES.get(int(self.device_id), 0)
        if self.device_id == DeviceId.BLOCK and size and self.config:
            if not self._has(ProtocolFeature.CONFIG):
                raise _Incompatible("the back-end no longer offers its config space")
            answer = await self._exchange(sock, Request.GET_CONFIG, {
                "offset": 0, "size": size, "flags": 0, "payload": bytes(size)}, reply=True)
            if bytes(answer.payload) != self._backend_config:
                raise _Incompatible("the back-end's config space changed (capacity or "
                                    "geometry differs)")

    # -- run: rings up, watch, rings down -------------------------------------------

    async def _call(self, sock: Any, request: Request, payload: Any = None, *,
                    fds: Sequence[int] = (), reply: bool = False) -> Any:
        need_reply = not reply and self._has(ProtocolFeature.REPLY_ACK)
        await send_message(sock, Message(request, payload, need_reply=need_reply), fds)
        if not (reply or need_reply):
            return None
        return _check_reply(request, await receive_message(sock), need_reply)

    async def _start_rings(self, sock: Any, context: DeviceContext, *, resume: bool) -> None:
        """The whole bring-up. ``resume``: after a lost connection, so each ring's base
        is the used idx in guest memory (see the module docstring), not the position
        the queue state holds."""
        self._bases_exact = False
        self._kick_sent = False
        # From here the back-end's device state moves on: what was saved or loaded
        # before no longer describes it (see the module docstring, "Snapshots").
        self._backend_state_valid = False
        self._backend_state_error = None
        # The dirty log settings as they are now; a change during the bring-up is
        # applied by run() right after it (the generation moved on).
        generation = self._log_generation
        dirty = self._dirty
        refused = None
        if dirty is not None and not self.can_log_dirty:
            # A back-end that came back without logging: the migration must not trust
            # the log (collect_dirty refuses); the guest's device goes on.
            self._dirty_error = self.dirty_log_problem()
            self._log.warning("vhost-user back-end cannot log dirty pages any more",
                              reason=self._dirty_error)
            refused = self._dirty_error
            dirty = None
        features = self._features_to_set(context, dirty)
        await self._call(sock, Request.SET_FEATURES, features)
        self._acked_features = features & ~(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        if self._has(ProtocolFeature.INFLIGHT_SHMFD):
            if self.inflight is None:
                self.inflight = await self._get_inflight(sock)
            await self._call(sock, Request.SET_INFLIGHT_FD, self.inflight.payload(),
                             fds=[self.inflight.fd])
        memory = self.memory
        regions = [{"guest_address": region.guest_address, "size": region.size,
                    "user_address": memory.host_address(region),
                    "mmap_offset": region.file_offset} for region in memory.regions]
        await self._call(sock, Request.SET_MEM_TABLE,
                         {"nregions": len(regions), "regions": regions},
                         fds=[memory.fd] * len(regions))
        if dirty is not None:
            try:
                await self._set_log_base(sock, dirty)
            except _Refused as e:
                # The guest's device runs on without logging; the migration that wanted
                # the log fails at its next collect_dirty.
                self._dirty_error = (f"vhost-user device {self.name}: the back-end at "
                                     f"{self.socket_path} refused the dirty log ({e})")
                self._log.warning("vhost-user back-end refused the dirty log",
                                  reason=str(e))
                refused = self._dirty_error
                dirty = None
        kick_fd = getattr(context, "kick_fd", None)
        call_fd = getattr(context, "call_fd", None)
        if kick_fd is None or call_fd is None:
            raise DeviceNeedsReset("the transport gives no eventfds to hand over")
        for index, queue in enumerate(context.queues):
            if queue is None:
                continue
            state = queue.state
            size = state.size
            await self._call(sock, Request.SET_VRING_NUM, {"index": index, "num": size})
            base = state.next_available & 0xFFFF
            if resume:
                base = context.memory.read_u16(state.used_ring + 2)
                state.next_available = base
            await self._call(sock, Request.SET_VRING_BASE, {"index": index, "num": base})
            await self._call(sock, Request.SET_VRING_ADDR,
                             self._vring_address(index, state, dirty is not None))
            self._started.append(index)
            await self._call(sock, Request.SET_VRING_CALL, index, fds=[call_fd])
            await self._set_vring_err(sock, index)
            # From the kick fd on, the back-end may run the ring (vhost-user.rst, "Ring
            # states"), even before this bring-up is confirmed. Known only with acks:
            # the one of the message before says it was alive up to here (without them,
            # a back-end that died at SET_FEATURES fails at the same place).
            self._kick_sent = self._has(ProtocolFeature.REPLY_ACK)
            await self._call(sock, Request.SET_VRING_KICK, index, fds=[kick_fd(index)])
            if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                await self._call(sock, Request.SET_VRING_ENABLE, {"index": index, "num": 1})
        if not self._has(ProtocolFeature.REPLY_ACK):
            # Without acks, a request with a reply is the barrier that shows the back-end
            # took the whole bring-up (it handles messages in order): one that drops
            # here failed to start rather than crashed while running.
            await self._exchange(sock, Request.GET_FEATURES, reply=True)
        # The driver may have made buffers available (and kicked) before DRIVER_OK: a
        # spurious kick per ring makes the back-end look; it costs nothing otherwise.
        for index in self._started:
            with contextlib.suppress(OSError):
                os.eventfd_write(kick_fd(index), 1)
        self._log_applied = generation
        self._log_refused = refused
        self._log_progressed()
        self._log.info("vhost-user rings started", rings=self._started,
                       features=hex(features), inflight=self.inflight is not None,
                       dirty_log=dirty is not None)

    def _features_to_set(self, context: DeviceContext, dirty: FrontendLog | None) -> int:
        """SET_FEATURES' value: what the driver negotiated, PROTOCOL_FEATURES where the
        back-end has them, and VHOST_F_LOG_ALL while the dirty log is on."""
        features = context.features
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            features |= VHOST_USER_F_PROTOCOL_FEATURES
        if self.device_id == DeviceId.NET:
            features &= ~VIRTIO_NET_F_MAC | self.backend_features
        if dirty is not None:
            features |= VHOST_F_LOG_ALL
        return features

    def _vring_address(self, index: int, state: Any, log: bool) -> dict[str, int]:
        """SET_VRING_ADDR's payload for ring ``index``: avmm's virtual addresses of its
        parts; with ``log``, VHOST_VRING_F_LOG and the used ring's guest physical
        address, where the back-end logs its used ring writes."""
        size = state.size
        event = 2 if state.event_idx else 0
        return {
            "index": index, "flags": VHOST_VRING_F_LOG if log else 0,
            "descriptor": self._user_address(state.descriptor_table, 16 * size),
            "used": self._user_address(state.used_ring, 4 + 8 * size + event),
            "available": self._user_address(state.available_ring, 4 + 2 * size + event),
            "log": state.used_ring if log else 0,
        }

    async def _set_vring_err(self, sock: Any, index: int) -> None:
        """Give the back-end ring ``index``'s error eventfd, which :meth:`_watch` waits
        on. A back-end that refuses it (REPLY_ACK) still runs; its errors then only
        show as a stalled ring."""
        fd = self._err_fds.get(index)
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._err_fds[index] = fd
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)  # an error reported before this bring-up is old news
        try:
            await self._call(sock, Request.SET_VRING_ERR, index, fds=[fd])
        except _Refused:
            self._log.info("vhost-user back-end refused SET_VRING_ERR; its ring errors "
                           "cannot reach the driver", ring=index)

    async def _get_inflight(self, sock: Any) -> InflightArea:
        num_queues = len(self.queue_max_sizes)
        queue_size = max(self.queue_max_sizes)
        await send_message(sock, Message(Request.GET_INFLIGHT_FD, {
            "mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues,
            "queue_size": queue_size}))
        answer = await receive_message(sock)
        fds, answer.fds = answer.fds, []
        try:
            payload = _check_reply(Request.GET_INFLIGHT_FD, answer, False)
            if len(fds) != 1:
                raise VhostProtocolError(f"GET_INFLIGHT_FD answered with {len(fds)} fds")
            if payload.mmap_size <= 0:
                raise VhostProtocolError("GET_INFLIGHT_FD answered an empty area")
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._log.info("inflight area", size=payload.mmap_size, queues=num_queues,
                       queue_size=queue_size)
        return InflightArea(fds[0], payload.mmap_size, payload.mmap_offset,
                            num_queues, queue_size)

    def _user_address(self, guest_address: int, length: int) -> int:
        for region in self.memory.regions:
            if region.guest_address <= guest_address and \
                    guest_address + length <= region.guest_address + region.size:
                return self.memory.host_address(region) + guest_address - region.guest_address
        raise DeviceNeedsReset(f"ring at guest 0x{guest_address:x} (+{length}) is not in RAM")

    async def _watch(self, sock: Any) -> None:
        """Wait until the back-end closes the connection or sends something it may not
        (without BACKEND_REQ it has nothing to say on this channel): VhostProtocolError;
        or signals the error eventfd of a running ring: DeviceNeedsReset; or the dirty
        log settings change: return (run() applies them and watches again)."""
        outcome: list[BaseException] = []
        self._log_wake = wake = trio.Event()
        async with trio.open_nursery() as nursery:

            async def first(wait: Any, *args: Any) -> None:
                try:
                    await wait(*args)
                except (VhostProtocolError, OSError, DeviceNeedsReset) as e:
                    outcome.append(e)
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, self._watch_connection, sock)
            # New dirty log settings: _watch returns (no outcome) and run() applies them.
            nursery.start_soon(first, wake.wait)
            if self._log_applied != self._log_generation:
                wake.set()
            for index in self._started:
                fd = self._err_fds.get(index)
                if fd is not None:
                    nursery.start_soon(first, self._watch_ring_error, index, fd)
        self._log_wake = None
        if outcome:
            raise outcome[0]

    @staticmethod
    async def _watch_connection(sock: Any) -> None:
        data = await sock.recv(1, socket.MSG_PEEK)
        if not data:
            raise VhostConnectionClosed("the back-end closed the connection")
        raise VhostProtocolError("the back-end sent an unexpected message")

    async def _watch_ring_error(self, index: int, fd: int) -> None:
        await wait_eventfd(fd)
        self._log.warning("vhost-user back-end reported a ring error", ring=index)
        raise DeviceNeedsReset(f"the vhost-user back-end at {self.socket_path} reported "
                               f"an error on ring {index}")

    async def _stop_rings(self, sock: Any, context: DeviceContext) -> None:
        """GET_VRING_BASE for every running ring. A back-end that does not answer in
        time (or breaks the protocol) is dropped, and its connection lingers until it
        closes its side (see :attr:`stop_unconfirmed`)."""
        started = list(self._started)
        try:
            with trio.fail_after(RING_TIMEOUT_S):
                for index in started:
                    answer = await send_and_receive_base(sock, index)
                    self._started.remove(index)
                    queue = context.queues[index]
                    if queue is not None:
                        queue.state.next_available = answer & 0xFFFF
        except (VhostProtocolError, OSError, trio.TooSlowError) as e:
            self._drop(f"stopping the rings failed: {_describe(e)}")
            return
        self._bases_exact = True
        self._log.info("vhost-user rings stopped", rings=started)

    def _drop(self, reason: str, *, logged: bool = False) -> None:
        """Close the connection; if rings may still run on it, let it linger."""
        if self.connected and not logged:
            self._log.warning("vhost-user back-end connection dropped", reason=reason)
        if self._started:
            self._linger(reason)
        self._close_connection()
        self._log_progressed()

    # -- has the back-end stopped? --------------------------------------------------

    @property
    def stop_unconfirmed(self) -> str | None:
        """Why the back-end may still touch guest memory although ``run`` has returned,
        or None. Any thread; never blocks.

        A back-end has stopped a ring once it answered GET_VRING_BASE for it, or once
        it closed its end of the connection: a vhost-user back-end stops the device
        when its front-end goes away and then closes (a killed process has unmapped
        guest memory before its sockets close). A connection the front-end had to
        drop with rings running (no answer in time, a protocol violation) is shut
        down for writing, which tells the back-end, and kept until the back-end's
        end-of-file shows that it has closed. The virtio-mmio slot does not let a
        driver's reset complete while this is not None.
        """
        with self._linger_lock:
            still = []
            for sock in self._lingering:
                if _closed_by_peer(sock):
                    sock.close()
                else:
                    still.append(sock)
            self._lingering = still
            if self._given_up is not None:
                return self._given_up
            if still:
                return ("the back-end has not yet closed a connection dropped while its "
                        f"rings ran ({self._linger_reason})")
            return None

    def _linger(self, reason: str) -> None:
        sock = self._trio_sock if self._trio_sock is not None else self._sock
        if sock is None:
            return
        try:
            copy = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as e:
            self._given_up = f"cannot keep the dropped connection to learn when the " \
                             f"back-end stops ({e}; after: {reason})"
            return
        try:
            copy.setblocking(False)
            copy.shutdown(socket.SHUT_WR)  # the back-end sees end-of-file and stops
        except OSError:
            copy.close()  # not connected any more: the back-end is gone
            return
        if _closed_by_peer(copy):
            copy.close()
            return
        self._log.warning("vhost-user back-end may still run rings; waiting for it to "
                          "close its connection", reason=reason)
        with self._linger_lock:
            self._lingering.append(copy)
            self._linger_reason = reason
            while len(self._lingering) > MAX_LINGERING:
                self._lingering.pop(0).close()
                self._given_up = ("a back-end dropped while its rings ran never closed its "
                                  f"connection ({reason})")

    # -- dirty logging (live migration) -------------------------------------------------

    @property
    def can_log_dirty(self) -> bool:
        """Whether the back-end can log its guest-memory writes for a live migration
        (it offers VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD)."""
        return self.dirty_log_problem() is None

    def dirty_log_problem(self) -> str | None:
        """One line saying why this device's back-end cannot take part in a live
        migration (its writes to guest memory could not be tracked), or None."""
        name = f"vhost-user device {self.name}"
        where = f"the vhost-user back-end at {self.socket_path}"
        if not self.backend_features & VHOST_F_LOG_ALL:
            return (f"{name}: {where} does not offer VHOST_F_LOG_ALL, so its writes to "
                    "guest memory cannot be tracked during a live migration")
        if not self._has(ProtocolFeature.LOG_SHMFD):
            return (f"{name}: {where} does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD (a "
                    "shared-memory dirty log), so its writes to guest memory cannot be "
                    "tracked during a live migration")
        return None

    async def start_dirty_log(self, memory_size: int) -> None:
        """Make the back-end log every page of guest memory it writes, from now until
        :meth:`stop_dirty_log` (see the module docstring, "Dirty logging").
        ``memory_size``: the guest RAM file's size in bytes (pages are numbered in it).
        Returns once a back-end whose rings run has taken the log, so every write after
        this call is in the log. VhostFrontendError with one line if the back-end cannot
        log or refuses the log."""
        problem = self.dirty_log_problem()
        if problem is not None:
            raise VhostFrontendError(problem)
        if self._dirty is not None:
            raise VhostFrontendError(f"vhost-user device {self.name}: dirty logging is "
                                     "already on")
        try:
            dirty = await trio.to_thread.run_sync(FrontendLog, self.memory.regions,
                                                  memory_size)
        except (OSError, ValueError) as e:
            raise VhostFrontendError(f"vhost-user device {self.name}: cannot create the "
                                     f"dirty log: {e}") from e
        self._dirty = dirty
        self._dirty_error = None
        try:
            await self._sync_log_settings()
        except BaseException:
            self._dirty = None
            with trio.CancelScope(shield=True), contextlib.suppress(VhostFrontendError):
                await self._sync_log_settings()
            dirty.close()
            raise
        self._log.info("vhost-user dirty logging on", log_size=dirty.size)

    def collect_dirty(self) -> PageSet:
        """The guest RAM pages (file offset // 4096) the back-end wrote since the last
        call (or since :meth:`start_dirty_log`), read and cleared from the log. Any
        thread; never blocks on the back-end. VhostFrontendError if logging is off or
        the log cannot be trusted (the back-end came back without logging)."""
        from ..migration.dirty import PageSet

        dirty = self._dirty
        if dirty is None:
            raise VhostFrontendError(f"vhost-user device {self.name}: dirty logging is "
                                     "not on")
        if self._dirty_error is not None:
            raise VhostFrontendError(self._dirty_error)
        try:
            bits = dirty.take()
        except ValueError as e:
            raise VhostFrontendError(f"vhost-user device {self.name}: {e}") from e
        return PageSet.from_bitmap(bits.to_bytes((dirty.pages + 7) // 8, "little"),
                                   dirty.pages)

    async def stop_dirty_log(self) -> None:
        """Tell the back-end to stop logging (where its rings run) and free the log.
        Never raises for the back-end's sake: a back-end that does not answer is only
        logged (it writes into its own mapping of a log nobody reads)."""
        dirty, self._dirty = self._dirty, None
        if dirty is None:
            return
        self._dirty_error = None
        try:
            await self._sync_log_settings()
        except VhostFrontendError as e:
            self._log.warning("vhost-user back-end did not take dirty logging off",
                              reason=str(e))
        finally:
            dirty.close()
        self._log.info("vhost-user dirty logging off")

    async def _sync_log_settings(self) -> None:
        """A new generation of log settings; wait until the device task has handed it
        to the back-end, if a connection with rings running or starting exists (else
        the next bring-up applies it: no back-end runs rings meanwhile)."""
        self._log_generation += 1
        wanted = self._log_generation
        try:
            with trio.fail_after(LOG_SYNC_TIMEOUT_S):
                while self._task_active and self.connected and self._log_applied < wanted:
                    if self._log_wake is not None:
                        self._log_wake.set()
                    await self._log_progress.wait()
        except trio.TooSlowError:
            raise VhostFrontendError(
                f"vhost-user device {self.name}: the back-end at {self.socket_path} did "
                f"not take the dirty log settings within {LOG_SYNC_TIMEOUT_S:g} s") from None
        if self._log_applied >= wanted and self._log_refused is not None:
            raise VhostFrontendError(self._log_refused)

    def _log_progressed(self) -> None:
        """Wake whoever waits in :meth:`_sync_log_settings`."""
        event, self._log_progress = self._log_progress, trio.Event()
        event.set()

    async def _serve_log_settings(self, sock: Any, context: DeviceContext) -> None:
        """Hand the current log settings to the running back-end (from run(), between
        two watches): SET_LOG_BASE (log on), SET_FEATURES with or without
        VHOST_F_LOG_ALL, SET_VRING_ADDR with or without VHOST_VRING_F_LOG per running
        ring, as QEMU does while rings run. A refusal is reported to the caller; a
        broken or silent back-end is lost (run() reconnects, and the bring-up applies
        the settings)."""
        generation = self._log_generation
        dirty = self._dirty
        refused = None
        try:
            with trio.CancelScope(shield=True), trio.fail_after(RING_TIMEOUT_S):
                if dirty is not None:
                    await self._set_log_base(sock, dirty)
                await self._call(sock, Request.SET_FEATURES,
                                 self._features_to_set(context, dirty))
                for index in self._started:
                    queue = context.queues[index]
                    if queue is not None:
                        await self._call(sock, Request.SET_VRING_ADDR,
                                         self._vring_address(index, queue.state,
                                                             dirty is not None))
                if not self._has(ProtocolFeature.REPLY_ACK):
                    # The barrier that shows the back-end took it all (see _start_rings).
                    await self._exchange(sock, Request.GET_FEATURES, reply=True)
        except _Refused as e:
            refused = (f"vhost-user device {self.name}: the back-end at "
                       f"{self.socket_path} refused the dirty log settings ({e})")
            self._log.warning("vhost-user back-end refused the dirty log settings",
                              reason=str(e))
        except trio.TooSlowError:
            raise VhostProtocolError("the back-end did not take the dirty log settings "
                                     f"within {RING_TIMEOUT_S:g} s") from None
        self._log_applied = generation
        self._log_refused = refused
        self._log_progressed()
        self._log.info("vhost-user dirty log settings applied", on=dirty is not None,
                       rings=self._started)

    async def _set_log_base(self, sock: Any, dirty: FrontendLog) -> None:
        """SET_LOG_BASE with the log's memfd. With LOG_SHMFD the back-end answers it
        whatever REPLY_ACK says (libvhost-user with a u64 that echoes the size, DPDK
        with no payload; 0 from avmm's back-end): the front-end waits for that answer,
        so the back-end has the log before anything else is sent."""
        try:
            fd = dirty.dup_fd()
        except ValueError as e:
            raise _Refused(str(e)) from None
        try:
            await send_message(sock, Message(Request.SET_LOG_BASE, {
                "mmap_size": dirty.size, "mmap_offset": 0}), [fd])
        finally:
            os.close(fd)
        answer = _check_reply(Request.SET_LOG_BASE, await receive_message(sock), False)
        if answer not in (None, 0, dirty.size):
            raise _Refused(f"SET_LOG_BASE answered {answer}")

    # -- snapshots ----------------------------------------------------------------------

    #: The state class :meth:`restore_state` takes.
    state_class: ClassVar[type] = VhostUserFrontendState

    async def fetch_device_state(self) -> None:
        """Take the back-end's device state (DEVICE_STATE) now, for :meth:`save_state`.
        Only while the rings are stopped and the connection is up; does nothing
        otherwise, or for a back-end without DEVICE_STATE. Never raises: a failure is
        kept, and :meth:`save_state` reports it. The stop path calls it (see the module
        docstring); a caller may call it again while the device task is stopped."""
        if not self._has(ProtocolFeature.DEVICE_STATE) or self._started \
                or not self.connected:
            return
        if self._trio_sock is None:
            if self._sock is None:
                return
            self._trio_sock = trio.socket.from_stdlib_socket(self._sock)
        sock = self._trio_sock
        self._backend_state_valid = False
        try:
            with trio.fail_after(STATE_TIMEOUT_S):
                data = await self._save_transfer(sock)
        except _Refused as e:
            # The back-end said no: the connection is still in step.
            self._backend_state_error = str(e)
        except (VhostProtocolError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError) as e:
            # Out of step or hung: this connection cannot be trusted any more. The
            # rings are stopped, so nothing lingers; the next run reconnects.
            reason = f"saving the back-end's device state failed: {_describe(e)}"
            self._backend_state_error = reason
            self._drop(reason)
        else:
            self._backend_state = data
            self._backend_state_valid = True
            self._backend_state_error = None
            self._log.info("vhost-user back-end device state saved", size=len(data))
            return
        self._log.warning("vhost-user back-end device state not saved",
                          reason=self._backend_state_error)

    async def _save_transfer(self, sock: Any) -> bytes:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                await send_message(sock, Message(Request.SET_DEVICE_STATE_FD, {
                    "direction": DEVICE_STATE_SAVE, "phase": DEVICE_STATE_PHASE_STOPPED}),
                    [write_end])
            finally:
                os.close(write_end)  # the back-end has its copy; its close is our EOF
            read_end = _state_channel(await receive_message(sock), read_end)
            stream = trio.lowlevel.FdStream(read_end)
            read_end = -1
            async with stream:
                data = await _receive_bounded(stream)
        finally:
            if read_end >= 0:
                os.close(read_end)
        status = await self._exchange(sock, Request.CHECK_DEVICE_STATE, reply=True)
        if status != 0:
            raise _Refused(f"the back-end's CHECK_DEVICE_STATE answered {status} "
                           "(its log says why)")
        return data

    def save_state(self) -> VhostUserFrontendState:
        """The front-end's state; only while the device task is stopped (see the module
        docstring). DeviceStateError if the back-end's device state (DEVICE_STATE)
        could not be taken at the last stop."""
        name = f"vhost-user device {self.name}"
        backend_state: bytes | None = None
        if self._has(ProtocolFeature.DEVICE_STATE):
            if self._backend_state_error is not None:
                raise DeviceStateError(f"{name}: {self._backend_state_error}")
            if not self._backend_state_valid:
                if not self.connected:
                    raise DeviceStateError(f"{name}: the vhost-user back-end at "
                                           f"{self.socket_path} is not connected, so its "
                                           "device state cannot be saved")
                raise DeviceStateError(f"{name}: the back-end's device state is not "
                                       "current (save only while the device is paused)")
            backend_state = self._backend_state
        inflight = None
        if self.inflight is not None:
            inflight = self._save_inflight(name, self.inflight)
        return VhostUserFrontendState(
            device_id=int(self.device_id), backend_features=self.backend_features,
            offered_features=self._features, acked_features=self._acked_features,
            protocol_features=self.protocol_features,
            queue_sizes=list(self.queue_max_sizes), config=bytes(self.config),
            inflight=inflight, backend_state=backend_state)

    @staticmethod
    def _save_inflight(name: str, area: InflightArea) -> VhostUserInflightState:
        if not 0 < area.mmap_size <= MAX_INFLIGHT_STATE:
            raise DeviceStateError(f"{name}: an inflight record of {area.mmap_size} bytes "
                                   f"(at most {MAX_INFLIGHT_STATE} are saved)")
        try:
            contents = os.pread(area.fd, area.mmap_size, area.mmap_offset)
        except OSError as e:
            raise DeviceStateError(f"{name}: cannot read the inflight record: {e}") from e
        if len(contents) != area.mmap_size:
            raise DeviceStateError(f"{name}: the inflight record has {len(contents)} of "
                                   f"{area.mmap_size} bytes")
        return VhostUserInflightState(area.num_queues, area.queue_size, contents)

    def restore_state(self, state: object) -> None:
        """Take ``state`` (after the device was built, connected and negotiated with the
        back-end the VM config names now, before its task starts). Checks that this
        back-end offers everything the snapshot negotiated, then loads the back-end's
        device state into it (DEVICE_STATE; a blocking exchange of at most
        :data:`STATE_TIMEOUT_S`: call it where blocking is allowed, as the VM build).
        DeviceStateError with one line if anything does not fit."""
        name = f"vhost-user device {self.name}"
        check_state_class(state, VhostUserFrontendState, name)
        assert isinstance(state, VhostUserFrontendState)
        where = f"the vhost-user back-end at {self.socket_path}"
        self._check_restorable(state, name, where)
        if self._trio_sock is not None or self._started or self._sock is None \
                or not self.connected:
            raise DeviceStateError(f"{name}: restore only a freshly connected device, "
                                   "before it runs")
        inflight = None
        if state.inflight is not None:
            inflight = _recreate_inflight(name, state.inflight)
        try:
            if state.backend_state is not None:
                self._load_backend_state(state.backend_state, name, where)
        except BaseException:
            if inflight is not None:
                inflight.close()
            raise
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = inflight
        self._features = state.offered_features
        self._acked_features = state.acked_features
        self._backend_state = state.backend_state
        self._backend_state_valid = True
        self._backend_state_error = None
        self._log.info("vhost-user device state restored",
                       backend_state=None if state.backend_state is None
                       else len(state.backend_state),
                       inflight=state.inflight is not None)

    def _check_restorable(self, state: VhostUserFrontendState, name: str,
                          where: str) -> None:
        if state.device_id != int(self.device_id):
            raise DeviceStateError(f"{name}: saved as device type {state.device_id}, "
                                   f"{where} serves type {int(self.device_id)}")
        if tuple(state.queue_sizes) != tuple(self.queue_max_sizes):
            raise DeviceStateError(
                f"{name}: saved with {len(state.queue_sizes)} queues of "
                f"{sorted(set(state.queue_sizes))}, the device now has "
                f"{len(self.queue_max_sizes)} of {sorted(set(self.queue_max_sizes))} "
                "(configure the queue count and size the snapshot used)")
        needed = state.acked_features
        if self.device_id == DeviceId.NET:
            needed &= ~VIRTIO_NET_F_MAC
        missing = needed & ~self.backend_features
        if missing:
            raise DeviceStateError(f"{name}: the driver negotiated features "
                                   f"0x{missing:x} that {where} does not offer")
        missing = state.offered_features & ~self._features
        if missing:
            raise DeviceStateError(f"{name}: the driver was offered features "
                                   f"0x{missing:x} that {where} does not offer")
        missing = state.protocol_features & ~self.protocol_features & ~_RESTORE_OPTIONAL
        if missing:
            names = ", ".join(_protocol_names(missing))
            raise DeviceStateError(f"{name}: {where} does not offer the protocol "
                                   f"features the snapshot used: {names}")
        if self.device_id == DeviceId.BLOCK and state.config != self.config:
            raise DeviceStateError(f"{name}: {where} serves another disk (its config "
                                   "space, capacity or geometry, differs from the "
                                   "snapshot's)")
        if len(state.config) > MAX_CONFIG_SIZE:
            raise DeviceStateError(f"{name}: a config space of {len(state.config)} bytes")
        if state.backend_state is not None \
                and len(state.backend_state) > MAX_DEVICE_STATE_SIZE:
            raise DeviceStateError(f"{name}: {len(state.backend_state)} bytes of back-end "
                                   f"state (at most {MAX_DEVICE_STATE_SIZE})")
        inflight = state.inflight
        if inflight is not None:
            if not self._has(ProtocolFeature.INFLIGHT_SHMFD):
                raise DeviceStateError(f"{name}: {where} does not offer "
                                       "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, which the "
                                       "snapshot used")
            if inflight.num_queues != len(self.queue_max_sizes) \
                    or inflight.queue_size != max(self.queue_max_sizes) \
                    or not 0 < len(inflight.contents) <= MAX_INFLIGHT_STATE:
                raise DeviceStateError(
                    f"{name}: an inflight record for {inflight.num_queues} queues of "
                    f"{inflight.queue_size} ({len(inflight.contents)} bytes) does not fit "
                    "the device")

    def _load_backend_state(self, data: bytes, name: str, where: str) -> None:
        """SET_DEVICE_STATE_FD (load), the bytes through a pipe, CHECK_DEVICE_STATE: on
        the blocking socket, every step bounded by :data:`STATE_TIMEOUT_S` in all."""
        assert self._sock is not None
        deadline = time.monotonic() + STATE_TIMEOUT_S
        blocking = _BlockingSocket(self._sock)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._sock.settimeout(STATE_TIMEOUT_S)
        try:
            try:
                _run_sync(send_message(blocking, Message(Request.SET_DEVICE_STATE_FD, {
                    "direction": DEVICE_STATE_LOAD, "phase": DEVICE_STATE_PHASE_STOPPED}),
                    [read_end]))
            finally:
                os.close(read_end)
            write_end = _state_channel(_run_sync(receive_message(blocking)), write_end)
            _write_until(write_end, data, deadline)
            os.close(write_end)  # end-of-file: the back-end applies what it read
            write_end = -1
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            _run_sync(send_message(blocking, Message(Request.CHECK_DEVICE_STATE)))
            status = _check_reply(Request.CHECK_DEVICE_STATE,
                                  _run_sync(receive_message(blocking)), False)
        except _Refused as e:
            raise DeviceStateError(f"{name}: {where} refused the saved device state "
                                   f"({e})") from None
        except (VhostProtocolError, OSError) as e:
            self._close_connection()
            raise DeviceStateError(f"{name}: loading the saved device state into {where} "
                                   f"failed: {_describe(e)}") from None
        finally:
            if write_end >= 0:
                os.close(write_end)
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        if status != 0:
            raise DeviceStateError(f"{name}: {where} refused the saved device state "
                                   f"(CHECK_DEVICE_STATE answered {status}; its log says "
                                   "why)")
        self._log.info("vhost-user back-end device state loaded", size=len(data))

    def reset(self) -> None:
        # The driver starts the rings afresh: the old inflight record means nothing now.
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.close()

    def close(self) -> None:
        """Close the connection (and any lingering one), the ring error eventfds and
        forget the inflight record (the VM is going away)."""
        self._close_connection()
        self.reset()
        dirty, self._dirty = self._dirty, None
        if dirty is not None:
            dirty.close()
        with self._linger_lock:
            lingering, self._lingering = self._lingering, []
        for sock in lingering:
            sock.close()
        err_fds, self._err_fds = self._err_fds, {}
        for fd in err_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_connection(self) -> None:
        """Close the connection (the back-end sees it go away and stops the device)."""
        self.connected = False
        self._started = []
        sock, self._sock = self._sock, None
        trio_sock, self._trio_sock = self._trio_sock, None
        if trio_sock is not None:
            trio_sock.close()
        elif sock is not None:
            sock.close()


async def send_and_receive_base(sock: Any, index: int) -> int:
    """GET_VRING_BASE for ring ``index``: stops it; returns its next available index."""
    await send_message(sock, Message(Request.GET_VRING_BASE, {"index": index, "num": 0}))
    answer = _check_reply(Request.GET_VRING_BASE, await receive_message(sock), False)
    if answer.index != index:
        raise VhostProtocolError(f"GET_VRING_BASE for ring {index} answered ring {answer.index}")
    return int(answer.num)


def _protocol_names(bits: int) -> list[str]:
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            try:
                names.append(f"VHOST_USER_PROTOCOL_F_{ProtocolFeature(bit).name}")
            except ValueError:
                names.append(f"protocol feature {bit}")
    return names


def _state_channel(answer: Message, own: int) -> int:
    """The fd to transfer device state through, from SET_DEVICE_STATE_FD's ``answer``:
    ``own`` (our end of the pipe), or the back-end's own channel that replaces it (then
    ``own`` is closed). _Refused for a failure answer; VhostProtocolError for a reply
    that breaks the protocol. The answer's fds are always consumed."""
    fds, answer.fds = answer.fds, []
    try:
        status = _check_reply(Request.SET_DEVICE_STATE_FD, answer, False)
        if status & DEVICE_STATE_ERROR_MASK:
            if fds:
                raise VhostProtocolError("SET_DEVICE_STATE_FD answered a failure with an fd")
            raise _Refused(f"SET_DEVICE_STATE_FD failed ({status & DEVICE_STATE_ERROR_MASK})")
        if status & ~(DEVICE_STATE_ERROR_MASK | DEVICE_STATE_NO_FD):
            raise VhostProtocolError(f"SET_DEVICE_STATE_FD answered 0x{status:x}")
        if status & DEVICE_STATE_NO_FD:
            if fds:
                raise VhostProtocolError("SET_DEVICE_STATE_FD said no fd but sent one")
            return own
        if len(fds) != 1:
            raise VhostProtocolError(f"SET_DEVICE_STATE_FD answered with {len(fds)} fds")
        mode = os.fstat(fds[0]).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise VhostProtocolError("SET_DEVICE_STATE_FD answered an fd that is not a "
                                     "pipe or socket")
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    os.close(own)
    return fds[0]


async def _receive_bounded(stream: Any) -> bytes:
    """Everything up to end-of-file, at most :data:`MAX_DEVICE_STATE_SIZE` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_DEVICE_STATE_SIZE:
            raise VhostProtocolError(f"the back-end sent more than {MAX_DEVICE_STATE_SIZE} "
                                     "bytes of device state")
        chunks.append(chunk)


def _write_until(fd: int, data: bytes, deadline: float) -> None:
    """Write all of ``data`` to ``fd`` (a pipe or socket) by ``deadline``
    (time.monotonic()); TimeoutError otherwise."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the back-end did not take the device state within "
                               f"{STATE_TIMEOUT_S:g} s")
        if not poller.poll(left * 1000):
            continue
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[written:]


def _recreate_inflight(name: str, state: VhostUserInflightState) -> InflightArea:
    """A sealed memfd holding a saved inflight record, to hand to the back-end."""
    fd = os.memfd_create("avmm-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(state.contents))
        if os.pwrite(fd, state.contents, 0) != len(state.contents):
            raise OSError("short write")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _INFLIGHT_SEALS)
    except OSError as e:
        os.close(fd)
        raise DeviceStateError(f"{name}: cannot re-create the inflight record: {e}") from e
    return InflightArea(fd, len(state.contents), 0, state.num_queues, state.queue_size)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the (non-blocking) peer has closed its end: end-of-file or a reset.
    Whatever the peer still sends is read and dropped, up to a bound per call."""
    for _ in range(16):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _check_reply(request: Request, answer: Message, ack: bool) -> Any:
    """The payload of ``answer`` if it is the reply to ``request`` (for a REPLY_ACK,
    None if it says success); a VhostProtocolError otherwise."""
    answer.close_fds()
    if answer.request != request or not answer.reply:
        raise VhostProtocolError(
            f"expected the reply to {request.name}, got "
            f"{'a reply to ' if answer.reply else 'a request '}{answer.request.name}")
    if ack:
        if answer.payload != 0:
            raise _Refused(f"{request.name} failed (REPLY_ACK {answer.payload})")
        return None
    return answer.payload
