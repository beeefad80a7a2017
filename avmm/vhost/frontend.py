"""avmm as a vhost-user front-end: a virtio device whose data path is another process.

:class:`VhostUserDevice` is a :class:`~avmm.virtio.device.VirtioDevice` that the usual
:class:`~avmm.virtio.mmio.MmioTransport` wraps, so register handling is exactly that of
an in-process device. What differs is where the queues are served:

* **Construction** (VM build, synchronous, on a blocking socket with a timeout):
  connect, SET_OWNER, GET_FEATURES, and when the back-end offers
  VHOST_USER_F_PROTOCOL_FEATURES (bit 30) GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG
  and MQ are acked where offered), GET_QUEUE_NUM (MQ) and GET_CONFIG (CONFIG; the
  config space is cached and served to the driver from the cache). Any failure is a
  :class:`VhostFrontendError`, which the VM turns into a ``VmStartError``.
* **run()** (the driver set DRIVER_OK): SET_FEATURES, SET_MEM_TABLE (avmm's RAM is one
  shared memfd: each region goes with that fd and its offset), and per ring the driver
  enabled SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (avmm's own virtual addresses
  of the rings), SET_VRING_CALL (the slot's irqfd eventfd), SET_VRING_KICK (the ring's
  KVM ioeventfd eventfd) and SET_VRING_ENABLE. From then on kicks go from KVM straight
  to the back-end and interrupts from the back-end straight to KVM: the data path never
  enters avmm. ``run`` then only watches the connection.
* **Stop** (driver reset, VM stop: ``run`` is cancelled): GET_VRING_BASE per ring stops
  it; the returned index goes back into the queue's state.

Because the back-end signals the irqfd itself, the transport never sees a used buffer
notification: the slot builds the transport with ``external_used_notifications`` (see
:mod:`avmm.virtio.mmio`) so InterruptStatus reports USED_BUFFER while the device runs.

A back-end that breaks the protocol or goes away after start puts the device in
DEVICE_NEEDS_RESET (:class:`DeviceNeedsReset`); the connection is closed. Reconnecting
is not implemented yet.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import AvmmError
from ..virtio.device import (
    VIRTIO_F_VERSION_1,
    DeviceContext,
    DeviceId,
    DeviceNeedsReset,
    VirtioDevice,
)
from .protocol import (
    MAX_CONFIG_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    ProtocolFeature,
    Request,
    VhostProtocolError,
    receive_message,
    send_message,
)

if TYPE_CHECKING:
    from ..memory import GuestMemory

log = structlog.get_logger(__name__)

__all__ = ["HANDSHAKE_TIMEOUT_S", "VhostFrontendError", "VhostUserDevice"]

#: How long the connection and each step of the handshake may take.
HANDSHAKE_TIMEOUT_S = 5.0
#: How long bringing the rings up (or stopping them) may take once the driver is ready.
RING_TIMEOUT_S = 5.0

#: Protocol features this front-end acks where the back-end offers them.
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.MQ)
)

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
                 timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.name = name
        self.memory = memory
        self._log = log.bind(device=name, socket=str(self.socket_path))
        try:
            self.device_id = DeviceId(device_id)
        except ValueError:
            self.device_id = device_id  # type: ignore[assignment]
        self.timeout = HANDSHAKE_TIMEOUT_S if timeout is None else timeout
        #: Negotiated state (plain values, for snapshots and logs).
        self.backend_features = 0
        self.protocol_features = 0
        self.backend_queue_num: int | None = None
        self.config = b""
        self.connected = False
        self._features = 0
        self._sock: socket.socket | None = None
        self._trio_sock: Any = None
        self._started: list[int] = []
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
                self.config = bytes(answer.payload)
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
        self._features = offered
        if num_queues is None:
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
        self.queue_max_sizes = (queue_size,) * num_queues

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
        if self._sock is None or not self.connected:
            raise DeviceNeedsReset(f"vhost-user back-end at {self.socket_path} is not "
                                   "connected (reconnecting is not supported yet)")
        if self._trio_sock is None:
            self._trio_sock = trio.socket.from_stdlib_socket(self._sock)
        sock = self._trio_sock
        try:
            with trio.CancelScope(shield=True):
                with trio.fail_after(RING_TIMEOUT_S):
                    await self._start_rings(sock, context)
            await self._watch(sock)
        except (VhostProtocolError, OSError, trio.TooSlowError) as e:
            self._drop(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise DeviceNeedsReset(
                f"vhost-user back-end at {self.socket_path}: {e or 'timed out'}") from e
        finally:
            if self.connected and self._started:
                with trio.CancelScope(shield=True):
                    await self._stop_rings(sock, context)

    # -- run: rings up, watch, rings down -------------------------------------------

    async def _call(self, sock: Any, request: Request, payload: Any = None, *,
                    fds: Sequence[int] = (), reply: bool = False) -> Any:
        need_reply = not reply and self._has(ProtocolFeature.REPLY_ACK)
        await send_message(sock, Message(request, payload, need_reply=need_reply), fds)
        if not (reply or need_reply):
            return None
        return _check_reply(request, await receive_message(sock), need_reply)

    async def _start_rings(self, sock: Any, context: DeviceContext) -> None:
        features = context.features
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            features |= VHOST_USER_F_PROTOCOL_FEATURES
        if self.device_id == DeviceId.NET:
            features &= ~VIRTIO_NET_F_MAC | self.backend_features
        await self._call(sock, Request.SET_FEATURES, features)
        memory = self.memory
        regions = [{"guest_address": region.guest_address, "size": region.size,
                    "user_address": memory.host_address(region),
                    "mmap_offset": region.file_offset} for region in memory.regions]
        await self._call(sock, Request.SET_MEM_TABLE,
                         {"nregions": len(regions), "regions": regions},
                         fds=[memory.fd] * len(regions))
        kick_fd = getattr(context, "kick_fd", None)
        call_fd = getattr(context, "call_fd", None)
        if kick_fd is None or call_fd is None:
            raise DeviceNeedsReset("the transport gives no eventfds to hand over")
        for index, queue in enumerate(context.queues):
            if queue is None:
                continue
            state = queue.state
            size = state.size
            event = 2 if state.event_idx else 0
            await self._call(sock, Request.SET_VRING_NUM, {"index": index, "num": size})
            await self._call(sock, Request.SET_VRING_BASE,
                             {"index": index, "num": state.next_available & 0xFFFF})
            await self._call(sock, Request.SET_VRING_ADDR, {
                "index": index, "flags": 0,
                "descriptor": self._user_address(state.descriptor_table, 16 * size),
                "used": self._user_address(state.used_ring, 4 + 8 * size + event),
                "available": self._user_address(state.available_ring, 4 + 2 * size + event),
                "log": 0,
            })
            self._started.append(index)
            await self._call(sock, Request.SET_VRING_CALL, index, fds=[call_fd])
            await self._call(sock, Request.SET_VRING_KICK, index, fds=[kick_fd(index)])
            if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                await self._call(sock, Request.SET_VRING_ENABLE, {"index": index, "num": 1})
        # The driver may have made buffers available (and kicked) before DRIVER_OK: a
        # spurious kick per ring makes the back-end look; it costs nothing otherwise.
        for index in self._started:
            with contextlib.suppress(OSError):
                os.eventfd_write(kick_fd(index), 1)
        self._log.info("vhost-user rings started", rings=self._started,
                       features=hex(features))

    def _user_address(self, guest_address: int, length: int) -> int:
        for region in self.memory.regions:
            if region.guest_address <= guest_address and \
                    guest_address + length <= region.guest_address + region.size:
                return self.memory.host_address(region) + guest_address - region.guest_address
        raise DeviceNeedsReset(f"ring at guest 0x{guest_address:x} (+{length}) is not in RAM")

    async def _watch(self, sock: Any) -> None:
        """Wait until the back-end closes the connection (or sends something it may
        not: without BACKEND_REQ it has nothing to say on this channel)."""
        data = await sock.recv(1, socket.MSG_PEEK)
        if not data:
            raise VhostProtocolError("the back-end closed the connection")
        raise VhostProtocolError("the back-end sent an unexpected message")

    async def _stop_rings(self, sock: Any, context: DeviceContext) -> None:
        started, self._started = self._started, []
        try:
            with trio.fail_after(RING_TIMEOUT_S):
                for index in started:
                    answer = await send_and_receive_base(sock, index)
                    queue = context.queues[index]
                    if queue is not None:
                        queue.state.next_available = answer & 0xFFFF
        except (VhostProtocolError, OSError, trio.TooSlowError) as e:
            self._drop(f"stopping the rings failed: {type(e).__name__}: {e}")
            return
        self._log.info("vhost-user rings stopped", rings=started)

    def _drop(self, reason: str) -> None:
        if self.connected:
            self._log.warning("vhost-user back-end connection dropped", reason=reason)
        self.close()

    def reset(self) -> None:
        pass

    def close(self) -> None:
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
            raise VhostProtocolError(f"{request.name} failed (REPLY_ACK {answer.payload})")
        return None
    return answer.payload
