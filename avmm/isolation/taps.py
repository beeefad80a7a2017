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
import dataclasses
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

import structlog

from ..netns import NetnsError, call_in_netns
from ..tap import (
    IFF_PERSIST,
    IFNAMSIZ,
    IFREQ_SIZE,
    TUNGETIFF,
    TUNSETGROUP,
    TUNSETOWNER,
    TUNSETPERSIST,
)

log = structlog.get_logger(__name__)

__all__ = ["TUNSETGROUP", "TUNSETOWNER", "TUNSETPERSIST", "UNSET", "HeldTap", "link_ids"]

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
#: No owner or group: the kernel's INVALID_UID/GID, as the ids read back here.
UNSET = -1

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
    reply = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_SIZE))
    name = reply[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
    (flags,) = struct.unpack_from("=H", reply, IFNAMSIZ)
    return name, flags


def link_ids(name: str, netns: str | None) -> tuple[int, int]:
    """The owner and group (:data:`UNSET` if none) of tap ``name`` in network namespace
    ``netns`` (``/run/netns/NAME``; None: this process's), over rtnetlink: no ioctl
    reads them back.

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
def _netlink_socket(netns: str | None) -> Iterator[socket.socket]:
    """A NETLINK_ROUTE socket of ``netns`` (a socket stays in the namespace it was made
    in: :func:`avmm.netns.call_in_netns` makes it there, on a thread of its own)."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)

    try:
        sock = make() if netns is None else call_in_netns(netns, make)
    except NetnsError as e:
        raise OSError(errno.EINVAL, str(e)) from None  # as any other failure here
    with sock:
        sock.settimeout(5)
        yield sock
