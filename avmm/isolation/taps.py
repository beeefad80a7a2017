"""The taps a worker was handed, put back as they were once it has ended (the worker
spawner's side; see :mod:`avmm.isolation.spawner`).

In process mode the daemon opens each NIC's tap (creating it, or attaching to a
persistent one an admin made) and hands the fd to the VM's worker. On an attached tap
fd the kernel checks no capability for TUNSETPERSIST, TUNSETOWNER and TUNSETGROUP
(``drivers/net/tun.c``, ``__tun_chr_ioctl``: only TUNSETIFF, when it creates or attaches,
asks for CAP_NET_ADMIN or the owner's ids), so a worker whose seccomp filter is off or
in log mode could make the tap the daemon created outlive its VM, owned by the worker's
uid, or take an admin's tap over. (In kill and errno mode its filter refuses the three.)

So the spawner keeps a copy of each tap fd from the worker's start, with the tap's
state then (persistent or not; owner and group, read over rtnetlink in the tap's network
namespace), and when the worker has ended, however it ended, puts it back: a tap that
was not persistent (the daemon created it for the VM) is made non-persistent again and
goes when this last fd is closed; an admin's persistent tap is persistent again, with its
owner and group. (An owner or group that was unset cannot be unset again: TUNSETOWNER
takes valid ids only. Then root's, 0, is set, which lets no other user attach, and a
warning says so.)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import socket
import struct

import structlog

from ..tap import IFNAMSIZ

log = structlog.get_logger(__name__)

# <linux/if_tun.h>: stable UAPI, as in avmm.tap.
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP = 0x400454CE  # _IOW('T', 206, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_PERSIST = 0x0800
_IFREQ_SIZE = 40

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>.
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_IFLA_IFNAME = 3
_IFLA_LINKINFO = 18
_IFLA_INFO_DATA = 2
_IFLA_TUN_OWNER = 1
_IFLA_TUN_GROUP = 2
_NLA_F_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x4000_0000
#: No owner or group: the kernel's INVALID_UID/GID, as the ids read back here.
UNSET = -1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


@dataclasses.dataclass
class HeldTap:
    """A copy of a worker's tap fd and the tap's state before the worker had it."""

    fd: int
    name: str
    netns: str | None
    persist: bool
    owner: int
    group: int

    @classmethod
    def take(cls, fd: int, netns: str | None) -> HeldTap:
        """Hold ``fd`` (a tap, attached; now this object's) and read its state.

        :raises OSError: it is not an attached tap, or its state cannot be read (the fd
            is still the caller's then)."""
        name, flags = _name_and_flags(fd)
        owner, group = link_ids(name, netns)
        return cls(fd, name, netns, bool(flags & IFF_PERSIST), owner, group)

    def restore(self) -> None:
        """Put the tap back as it was and close the fd (call it once the worker has
        ended: a live one could change it again)."""
        try:
            if not self.persist:
                # Created for the VM: it goes with its last fd, this one.
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
                return
            fcntl.ioctl(self.fd, TUNSETPERSIST, 1)
            owner, group = link_ids(self.name, self.netns)
            for what, request, before, now in (("owner", TUNSETOWNER, self.owner, owner),
                                               ("group", TUNSETGROUP, self.group, group)):
                if now == before:
                    continue
                if before == UNSET:
                    log.warning("a worker set a tap's owner or group, which cannot be "
                                "unset again; set to root's", tap=self.name,
                                netns=self.netns, what=what, was=now)
                fcntl.ioctl(self.fd, request, 0 if before == UNSET else before)
        except OSError as e:
            log.warning("could not put a worker's tap back as it was", tap=self.name,
                        netns=self.netns, reason=os.strerror(e.errno or 0))
        finally:
            os.close(self.fd)
            self.fd = -1


def _name_and_flags(fd: int) -> tuple[str, int]:
    reply = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ_SIZE))
    name = reply[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
    (flags,) = struct.unpack_from("=H", reply, IFNAMSIZ)
    return name, flags


def link_ids(name: str, netns: str | None) -> tuple[int, int]:
    """The owner and group (:data:`UNSET` if none) of tap ``name`` in network namespace
    ``netns`` (``/run/netns/NAME``; None: this process's), over rtnetlink: no ioctl
    reads them back. Switches the calling thread's network namespace for a moment.

    :raises OSError: the link cannot be read.
    """
    with _netlink_socket(netns) as sock:
        encoded = name.encode() + b"\0"
        attribute = struct.pack("=HH", 4 + len(encoded), _IFLA_IFNAME) + encoded
        attribute += bytes(-len(attribute) % 4)
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + attribute
        sock.send(struct.pack("=IHHII", 16 + len(body), _RTM_GETLINK, _NLM_F_REQUEST, 1, 0)
                  + body)
        reply = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        raise OSError(-error, os.strerror(-error))
    if kind != _RTM_NEWLINK or length > len(reply):
        raise OSError(0, "an unexpected rtnetlink answer")
    ids = {_IFLA_TUN_OWNER: UNSET, _IFLA_TUN_GROUP: UNSET}
    for linkinfo in _attributes(reply[32:length], _IFLA_LINKINFO):
        for data in _attributes(linkinfo, _IFLA_INFO_DATA):
            for key in ids:
                for value in _attributes(data, key):
                    (ids[key],) = struct.unpack_from("=I", value)
    return ids[_IFLA_TUN_OWNER], ids[_IFLA_TUN_GROUP]


def _attributes(data: bytes, wanted: int) -> list[bytes]:
    found = []
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            break
        if kind & _NLA_F_MASK == wanted:
            found.append(data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return found


@contextlib.contextmanager
def _netlink_socket(netns: str | None):  # type: ignore[no-untyped-def]
    """A NETLINK_ROUTE socket of ``netns`` (a socket stays in the namespace it was made
    in; the thread goes back to its own at once)."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
    else:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(target, _CLONE_NEWNET) != 0:
                    number = ctypes.get_errno()
                    raise OSError(number, os.strerror(number))
                try:
                    sock = socket.socket(socket.AF_NETLINK,
                                         socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                         socket.NETLINK_ROUTE)
                finally:
                    if _libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover
                        os._exit(70)  # a spawner in the wrong namespace must not go on
            finally:
                os.close(target)
        finally:
            os.close(own)
    with sock:
        sock.settimeout(5)
        yield sock
