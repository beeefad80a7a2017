"""The vhost-user wire protocol (QEMU's docs/interop/vhost-user.rst), declared once.

A message is a 12-byte header (u32 request, u32 flags, u32 payload size; native byte
order, little-endian on every host we run on) followed by the payload; file descriptors
travel with the message as SCM_RIGHTS ancillary data (at most :data:`MAX_FDS`).

Every payload layout is a construct ``Struct`` in :data:`PAYLOADS`, by request and
direction (a reply may be shaped differently from its request). :func:`receive_message`
trusts nothing: an unknown request, a payload of the wrong size for its request, a
payload larger than :data:`MAX_PAYLOAD`, fds where the request takes none, too many
fds or a message cut short raise :class:`VhostProtocolError`, and the fds that did
arrive are closed before it is raised. The peer that sent it is at fault; the caller
drops the connection.

A well-formed request that asks for something the receiver cannot do (a ring size
above its maximum, an fd that is not an eventfd) is not a protocol break: the handler
raises :class:`VhostRequestRefused`, and the back-end answers it with a failure where the
protocol has a way to say so (REPLY_ACK, an empty GET_CONFIG reply) and keeps the
connection. The one reply that may be empty is GET_CONFIG's (:data:`EMPTY_REPLIES`):
vhost-user.rst makes a zero-length payload its error answer. It is sent with ``payload``
None, and :func:`receive_message` raises :class:`VhostRequestRefused` for it (the
connection is still in step: the receiver may go on or hang up). SET_DEVICE_STATE_FD and
CHECK_DEVICE_STATE (:data:`STATUS_REPLIES`) are always answered with a u64 status,
REPLY_ACK or not: a refusal is a non-zero status there.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import construct as c

from ..errors import AvmmError

__all__ = [
    "DEVICE_STATE_LOAD",
    "DEVICE_STATE_NO_FD",
    "DEVICE_STATE_PHASE_STOPPED",
    "DEVICE_STATE_SAVE",
    "EMPTY_REPLIES",
    "EVENTFD_LINK",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEMORY_REGIONS",
    "MAX_PAYLOAD",
    "OPTIONAL_REPLY_PAYLOADS",
    "REPLY_BODIES",
    "STATUS_REPLIES",
    "VHOST_F_LOG_ALL",
    "VHOST_LOG_PAGE",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "Message",
    "ProtocolFeature",
    "Request",
    "VhostConnectionClosed",
    "VhostProtocolError",
    "VhostRequestRefused",
    "receive_message",
    "send_message",
]


class VhostProtocolError(AvmmError):
    """The peer sent something the protocol does not allow; drop the connection."""


class VhostConnectionClosed(VhostProtocolError):
    """The peer closed the connection between two messages (an orderly goodbye)."""


class VhostRequestRefused(VhostProtocolError):
    """A well-formed request the receiver cannot honour: answer it with a failure and
    keep the connection (see the module docstring). Unhandled, it drops the connection
    like any protocol error."""


class Request(IntEnum):
    """Front-end → back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(IntEnum):
    """Bit numbers of the protocol features (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


#: Virtio feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

#: Virtio feature bit 26 (vhost only): the back-end logs its guest-memory writes in the
#: dirty log of SET_LOG_BASE while the front-end sets it (live migration).
VHOST_F_LOG_ALL = 1 << 26
#: SET_VRING_ADDR flags bit 0: also log writes to this ring's used ring, at the ``log``
#: address of the message (the used ring's guest physical address).
VHOST_VRING_F_LOG = 1 << 0
#: The dirty log's page: one bit per 4 KiB of guest physical address space.
VHOST_LOG_PAGE = 4096

#: Header flags.
FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
_KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Vring fd payloads (SET_VRING_KICK/CALL/ERR): ring index and the "no fd" bit.
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

#: What /proc/self/fd/N links to for an eventfd: the only fd kind a kick, call or
#: error fd may be.
EVENTFD_LINK = "anon_inode:[eventfd]"

#: SET_DEVICE_STATE_FD: the transfer's direction (request), and the reply's flag for
#: "no fd of the back-end's own comes with this answer" (bits 0-7 are the error code).
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
#: The only migration phase vhost-user defines: the device and all its rings stopped.
DEVICE_STATE_PHASE_STOPPED = 0
DEVICE_STATE_NO_FD = 1 << 8
DEVICE_STATE_ERROR_MASK = 0xFF

MAX_FDS = 8
MAX_MEMORY_REGIONS = 8
MAX_CONFIG_SIZE = 256
#: The largest payload accepted; the largest legitimate one (a full memory table) is 264.
MAX_PAYLOAD = 4096

Header = c.Struct("request" / c.Int32ul, "flags" / c.Int32ul, "size" / c.Int32ul)
HEADER_SIZE = Header.sizeof()

U64 = c.Int64ul
VringState = c.Struct("index" / c.Int32ul, "num" / c.Int32ul)
VringAddress = c.Struct(
    "index" / c.Int32ul,
    "flags" / c.Int32ul,
    "descriptor" / c.Int64ul,
    "used" / c.Int64ul,
    "available" / c.Int64ul,
    "log" / c.Int64ul,
)
MemoryRegion = c.Struct(
    "guest_address" / c.Int64ul,
    "size" / c.Int64ul,
    "user_address" / c.Int64ul,
    "mmap_offset" / c.Int64ul,
)
MemoryTable = c.Struct(
    "nregions" / c.Int32ul,
    c.Check(c.this.nregions <= MAX_MEMORY_REGIONS),
    "padding" / c.Default(c.Int32ul, 0),
    "regions" / c.Array(c.this.nregions, MemoryRegion),
)
SingleMemoryRegion = c.Struct("padding" / c.Default(c.Int64ul, 0), "region" / MemoryRegion)
LogDescription = c.Struct("mmap_size" / c.Int64ul, "mmap_offset" / c.Int64ul)
Config = c.Struct(
    "offset" / c.Int32ul,
    "size" / c.Int32ul,
    c.Check(c.this.size <= MAX_CONFIG_SIZE),
    "flags" / c.Default(c.Int32ul, 0),
    "payload" / c.Bytes(c.this.size),
)
Inflight = c.Struct(
    "mmap_size" / c.Int64ul,
    "mmap_offset" / c.Int64ul,
    "num_queues" / c.Int16ul,
    "queue_size" / c.Int16ul,
    c.Padding(4),
)
DeviceStateTransfer = c.Struct("direction" / c.Int32ul, "phase" / c.Int32ul)
Iotlb = c.Struct(
    "iova" / c.Int64ul,
    "size" / c.Int64ul,
    "user_address" / c.Int64ul,
    "permission" / c.Int8ul,
    "type" / c.Int8ul,
    c.Padding(6),
)

_EMPTY = None
R = Request

#: Payload layout by request: (request payload, reply payload); None = no payload.
PAYLOADS: dict[Request, tuple[Any, Any]] = {
    R.GET_FEATURES: (_EMPTY, U64),
    R.SET_FEATURES: (U64, U64),
    R.SET_OWNER: (_EMPTY, U64),
    R.RESET_OWNER: (_EMPTY, U64),
    R.SET_MEM_TABLE: (MemoryTable, U64),
    R.SET_LOG_BASE: (LogDescription, U64),
    R.SET_LOG_FD: (_EMPTY, U64),
    R.SET_VRING_NUM: (VringState, U64),
    R.SET_VRING_ADDR: (VringAddress, U64),
    R.SET_VRING_BASE: (VringState, U64),
    R.GET_VRING_BASE: (VringState, VringState),
    R.SET_VRING_KICK: (U64, U64),
    R.SET_VRING_CALL: (U64, U64),
    R.SET_VRING_ERR: (U64, U64),
    R.GET_PROTOCOL_FEATURES: (_EMPTY, U64),
    R.SET_PROTOCOL_FEATURES: (U64, U64),
    R.GET_QUEUE_NUM: (_EMPTY, U64),
    R.SET_VRING_ENABLE: (VringState, U64),
    R.SEND_RARP: (U64, U64),
    R.NET_SET_MTU: (U64, U64),
    R.SET_BACKEND_REQ_FD: (_EMPTY, U64),
    R.IOTLB_MSG: (Iotlb, U64),
    R.SET_VRING_ENDIAN: (VringState, U64),
    R.GET_CONFIG: (Config, Config),
    R.SET_CONFIG: (Config, U64),
    R.POSTCOPY_ADVISE: (_EMPTY, U64),
    R.POSTCOPY_LISTEN: (_EMPTY, U64),
    R.POSTCOPY_END: (_EMPTY, U64),
    R.GET_INFLIGHT_FD: (Inflight, Inflight),
    R.SET_INFLIGHT_FD: (Inflight, U64),
    R.RESET_DEVICE: (_EMPTY, U64),
    R.VRING_KICK: (VringState, U64),
    R.GET_MAX_MEM_SLOTS: (_EMPTY, U64),
    R.ADD_MEM_REG: (SingleMemoryRegion, U64),
    R.REM_MEM_REG: (SingleMemoryRegion, U64),
    R.SET_STATUS: (U64, U64),
    R.GET_STATUS: (_EMPTY, U64),
    R.SET_DEVICE_STATE_FD: (DeviceStateTransfer, U64),
    R.CHECK_DEVICE_STATE: (_EMPTY, U64),
}
#: Requests whose reply has a body of its own (not the REPLY_ACK u64): a back-end
#: cannot answer them with a bare failure code.
REPLY_BODIES = frozenset({
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE, R.GET_QUEUE_NUM,
    R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_MAX_MEM_SLOTS, R.GET_STATUS,
})
#: Requests that are always answered with a u64 status (0: success), whatever
#: REPLY_ACK says: a refusal is that status, not a hang-up.
STATUS_REPLIES = frozenset({R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE})
#: Replies that may come with no payload at all: the back-end's error answer.
EMPTY_REPLIES = frozenset({R.GET_CONFIG})
#: Replies whose payload may be absent or a u64 (received as None or an int): the answer
#: to SET_LOG_BASE (with LOG_SHMFD), which vhost-user.rst lists as having no payload but
#: which libvhost-user answers with a u64 (the log size, echoed) and DPDK with none.
OPTIONAL_REPLY_PAYLOADS = frozenset({R.SET_LOG_BASE})
#: How many fds a request may carry (both directions; replies carry the same or none).
_FD_LIMITS: dict[Request, int] = {
    R.SET_MEM_TABLE: MAX_MEMORY_REGIONS,
    R.SET_LOG_BASE: 1,
    R.SET_LOG_FD: 1,
    R.SET_VRING_KICK: 1,
    R.SET_VRING_CALL: 1,
    R.SET_VRING_ERR: 1,
    R.SET_BACKEND_REQ_FD: 1,
    R.GET_INFLIGHT_FD: 1,
    R.SET_INFLIGHT_FD: 1,
    R.ADD_MEM_REG: 1,
    R.POSTCOPY_ADVISE: 1,
    R.SET_DEVICE_STATE_FD: 1,
}

_EXACT = {fmt: c.FocusedSeq("value", "value" / fmt, c.Terminated)
          for pair in PAYLOADS.values() for fmt in pair if fmt is not None}


@dataclass
class Message:
    """One message. ``payload``: an int for u64 payloads, a dict/Container for structs,
    None for none. ``fds`` (received messages only) are owned by the receiver, who
    must close them."""

    request: Request
    payload: Any = None
    reply: bool = False
    need_reply: bool = False
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def payload_format(request: Request, reply: bool) -> Any:
    return PAYLOADS[request][1 if reply else 0]


def encode_message(message: Message) -> bytes:
    """Header and payload as bytes (a VhostProtocolError if the payload does not fit its
    request's layout: a bug in the caller)."""
    fmt = payload_format(message.request, message.reply)
    if message.reply and message.payload is None and (
            message.request in EMPTY_REPLIES or message.request in OPTIONAL_REPLY_PAYLOADS):
        fmt = None
    if fmt is None:
        if message.payload is not None:
            raise VhostProtocolError(f"{message.request.name} takes no payload")
        body = b""
    else:
        try:
            body = fmt.build(message.payload)
        except (c.ConstructError, TypeError, ValueError, KeyError) as e:
            raise VhostProtocolError(
                f"cannot encode {message.request.name} payload {message.payload!r}: {e}"
            ) from e
    flags = FLAG_VERSION
    if message.reply:
        flags |= FLAG_REPLY
    if message.need_reply:
        flags |= FLAG_NEED_REPLY
    return Header.build({"request": int(message.request), "flags": flags, "size": len(body)}) + body


async def send_message(sock: Any, message: Message, fds: Any = ()) -> None:
    """Send ``message`` with ``fds`` attached (SCM_RIGHTS) on a trio unix socket."""
    fds = list(fds)
    if len(fds) > MAX_FDS:
        raise VhostProtocolError(f"at most {MAX_FDS} fds per message, asked to send {len(fds)}")
    data = memoryview(encode_message(message))
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                 if fds else [])
    while data:
        sent = await sock.sendmsg([data], ancillary)
        ancillary = []
        data = data[sent:]


def _take_fds(ancillary: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            into.extend(array.array("i", data[:usable]))


async def _receive_exactly(sock: Any, count: int, fds: list[int], *, start: bool) -> bytes:
    """``count`` bytes, collecting any fds that arrive with them."""
    chunks: list[bytes] = []
    missing = count
    while missing:
        data, ancillary, flags, _ = await sock.recvmsg(
            missing, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        _take_fds(ancillary, fds)
        if flags & socket.MSG_CTRUNC:
            raise VhostProtocolError(f"more than {MAX_FDS} fds sent with one message")
        if not data:
            if start and missing == count:
                raise VhostConnectionClosed("the peer closed the connection")
            raise VhostProtocolError(
                f"connection closed in the middle of a message ({count - missing} of "
                f"{count} bytes received)"
            )
        chunks.append(data)
        missing -= len(data)
    return b"".join(chunks)


async def receive_message(sock: Any) -> Message:
    """Receive and check one message (see the module docstring). The caller owns the
    returned message's fds."""
    fds: list[int] = []
    try:
        header = Header.parse(await _receive_exactly(sock, HEADER_SIZE, fds, start=True))
        try:
            request = Request(header.request)
        except ValueError:
            raise VhostProtocolError(f"unknown request code {header.request}") from None
        flags = header.flags
        if flags & FLAG_VERSION_MASK != FLAG_VERSION:
            raise VhostProtocolError(
                f"{request.name}: protocol version {flags & FLAG_VERSION_MASK}, expected 1"
            )
        if flags & ~_KNOWN_FLAGS:
            raise VhostProtocolError(f"{request.name}: unknown header flags 0x{flags:x}")
        if header.size > MAX_PAYLOAD:
            raise VhostProtocolError(
                f"{request.name}: payload of {header.size} bytes (at most {MAX_PAYLOAD})"
            )
        reply = bool(flags & FLAG_REPLY)
        body = await _receive_exactly(sock, header.size, fds, start=False)
        if request not in PAYLOADS:
            # Crypto sessions, GPU sockets: no layout declared, so nothing to parse.
            raise VhostProtocolError(f"{request.name} is not supported")
        fmt = payload_format(request, reply)
        if reply and not header.size and request in EMPTY_REPLIES:
            raise VhostRequestRefused(f"{request.name} answered with an empty payload "
                                      "(the back-end's error answer)")
        if reply and not header.size and request in OPTIONAL_REPLY_PAYLOADS:
            fmt = None
        if fmt is None:
            if header.size:
                raise VhostProtocolError(
                    f"{request.name} takes no payload, got {header.size} bytes"
                )
            payload = None
        else:
            try:
                payload = _EXACT[fmt].parse(body)
            except c.ConstructError as e:
                raise VhostProtocolError(
                    f"{request.name}: malformed payload of {header.size} bytes "
                    f"({type(e).__name__})"
                ) from None
        limit = _FD_LIMITS.get(request, 0)
        if len(fds) > limit:
            raise VhostProtocolError(
                f"{request.name} may carry {limit} fds, {len(fds)} were sent"
            )
        return Message(request, payload, reply=reply,
                       need_reply=bool(flags & FLAG_NEED_REPLY), fds=fds)
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
