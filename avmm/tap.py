"""A Linux tap device: the host end of a guest's network card.

:meth:`Tap.open` opens ``/dev/net/tun`` and attaches to a tap interface with
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every read returns, and every write takes, one
Ethernet frame preceded by a ``struct virtio_net_hdr`` of ``vnet_header_size`` bytes
(12 by default, the virtio 1.x header with ``num_buffers``), so a virtio-net device can
pass frames between guest buffers and the tap without reformatting them.

If the named interface does not exist it is created (this needs CAP_NET_ADMIN) and it
disappears when the fd is closed; an existing tap, for example one made beforehand with
``ip tuntap add mode tap name tap0 vnet_hdr user $USER``, is attached to (which only
needs permission on that tap). No offloads are enabled: the kernel hands over fully
checksummed, unsegmented frames until a device negotiates offloads with the guest and
calls :meth:`Tap.set_offload`.

The fd is non-blocking; callers wait for it with ``trio.lowlevel.wait_readable`` /
``wait_writable``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import final

import trio

from .errors import AvmmError

__all__ = [
    "IFNAMSIZ",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "Tap",
    "TapError",
]

TUN_DEVICE = "/dev/net/tun"

# Linux UAPI (<linux/if_tun.h>, <linux/if.h>): these ioctl numbers, flags and the ifreq
# layout are part of the kernel's stable user-space ABI and never change, so they are
# written out here rather than compiled from the header.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
# Those that change an attached tap's life or ownership, and the one that reads its
# flags back (avmm.isolation.taps puts a worker's taps back with them).
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP = 0x400454CE  # _IOW('T', 206, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
#: Interface names are at most IFNAMSIZ - 1 bytes (the kernel keeps a NUL).
IFNAMSIZ = 16
# struct ifreq: char ifr_name[IFNAMSIZ]; then a union whose largest member is 24 bytes on
# 64-bit; TUNSETIFF reads ifr_flags (a short) from its start and writes back the name.
_IFREQ = struct.Struct("=16sH22x")
IFREQ_SIZE = _IFREQ.size

#: The smallest header the kernel accepts (struct virtio_net_hdr without num_buffers).
MIN_VNET_HEADER_SIZE = 10


class TapError(AvmmError):
    """A tap device could not be opened or configured; the message says what to fix."""

    def __init__(self, message: str, *, name: str | None = None, errno: int | None = None):
        self.name = name
        self.errno = errno
        super().__init__(message)


def _check_name(name: str) -> bytes:
    encoded = name.encode("utf-8", "surrogateescape")
    if not encoded:
        raise TapError("tap name is empty: give a name or None to let the kernel pick one")
    if len(encoded) >= IFNAMSIZ:
        raise TapError(
            f"tap name {name!r} is {len(encoded)} bytes long: Linux interface names are "
            f"at most {IFNAMSIZ - 1} bytes",
            name=name,
        )
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise TapError(
            f"tap name {name!r} is not a valid interface name (no '/', ':' or whitespace)",
            name=name,
        )
    return encoded


def _explain_open(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (
            f"no permission to open {TUN_DEVICE}: run as root, or give this user access "
            f"to {TUN_DEVICE} and a tap made with `ip tuntap add ... user <user>`"
        )
    return f"cannot open {TUN_DEVICE}: {os.strerror(e.errno or 0)}"


def _explain_setiff(e: OSError, name: str | None) -> str:
    shown = repr(name) if name else "a new tap"
    if e.errno == errno.EPERM:
        return (
            f"cannot create or attach to {shown}: this needs CAP_NET_ADMIN (run as root), "
            f"or create the tap beforehand for this user with "
            f"`ip tuntap add mode tap name {name or 'tap0'} vnet_hdr user <user>`"
        )
    if e.errno == errno.EBUSY:
        return (
            f"tap {shown} is busy: another process (another VM?) is attached to it, or it "
            f"was created with multi_queue; close the other user or pick another name"
        )
    if e.errno == errno.EINVAL:
        return (
            f"cannot attach to {shown}: the name is taken by an interface that is not a "
            f"tap, or by a tap created with incompatible flags (tun mode, multi_queue)"
        )
    return f"TUNSETIFF on {shown} failed: {os.strerror(e.errno or 0)}"


@final
class Tap:
    """An open tap device (one queue). Use :meth:`open` to make one.

    ``fd`` is non-blocking; each ``read``/``readv`` returns one frame and each
    ``write``/``writev`` sends one, with a ``vnet_header_size``-byte virtio-net header in
    front. The object owns the fd: :meth:`close` (or leaving a ``with`` block) closes it,
    which removes a tap the open created.
    """

    def __init__(self, fd: int, name: str, vnet_header_size: int) -> None:
        self.fd = fd
        self.name = name
        self.vnet_header_size = vnet_header_size
        self.offload = 0

    @classmethod
    def handed_over(cls, fd: int, name: str, *, vnet_header_size: int = 12) -> Tap:
        """A tap another process opened with :meth:`open` and handed over (the daemon of
        a jailed worker): attached, non-blocking, ``vnet_header_size`` set, no offloads.
        Nothing here needs a privilege: the ioctls on an attached tap's fd
        (:meth:`set_offload`, TUNSETVNETHDRSZ) need none."""
        return cls(fd, name, vnet_header_size)

    @classmethod
    def open(cls, name: str | None, *, vnet_header_size: int = 12) -> Tap:
        """Create the tap ``name`` (or, with ``None``, a new ``tapN`` the kernel names),
        or attach to it if it exists, with virtio-net headers of ``vnet_header_size``
        bytes and no offloads. Raises :class:`TapError` saying what to fix."""
        encoded = _check_name(name) if name is not None else b""
        if vnet_header_size < MIN_VNET_HEADER_SIZE:
            raise TapError(
                f"vnet_header_size {vnet_header_size} is smaller than the "
                f"{MIN_VNET_HEADER_SIZE}-byte struct virtio_net_hdr",
                name=name,
            )
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(_explain_open(e), name=name, errno=e.errno) from e
        try:
            request = _IFREQ.pack(encoded, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                reply = fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as e:
                raise TapError(_explain_setiff(e, name), name=name, errno=e.errno) from e
            actual = _IFREQ.unpack(reply)[0].split(b"\0", 1)[0].decode(
                "utf-8", "surrogateescape"
            )
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("=i", vnet_header_size))
            except OSError as e:
                raise TapError(
                    f"TUNSETVNETHDRSZ {vnet_header_size} on tap {actual!r} failed: "
                    f"{os.strerror(e.errno or 0)}",
                    name=actual,
                    errno=e.errno,
                ) from e
            tap = cls(fd, actual, vnet_header_size)
            tap.set_offload(0)
        except BaseException:
            os.close(fd)
            raise
        return tap

    def set_offload(self, flags: int) -> None:
        """Tell the kernel which offloads the reader accepts (``TUN_F_*``): which
        partially checksummed or segmented frames it may hand over."""
        if self.closed:
            raise TapError(f"tap {self.name!r} is closed", name=self.name)
        try:
            # TUNSETOFFLOAD takes the flags themselves as the argument, not a pointer.
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(
                f"TUNSETOFFLOAD 0x{flags:x} on tap {self.name!r} failed: "
                f"{os.strerror(e.errno or 0)}",
                name=self.name,
                errno=e.errno,
            ) from e
        self.offload = flags

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def detach(self) -> int:
        """The fd, which the caller owns from here (to hand it to another process); this
        object is closed without closing it."""
        if self.closed:
            raise TapError(f"tap {self.name!r} is closed", name=self.name)
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        """Close the fd (idempotent). A tap this object created goes away with it."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                # Wake any trio task waiting on the fd before it is closed (and maybe reused).
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:
                pass  # not inside trio.run: nobody can be waiting
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap(name={self.name!r}, fd={self.fd})"
