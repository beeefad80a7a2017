"""Host-side helpers for tests that run the test guest's virtio scenarios.

The guest's contracts (output lines, options, the blk pattern) are in
tests/guest/README.md; this module is their host half:

* :func:`blk_pattern` / :func:`expected_pattern`: what ``blk-write`` puts on a disk;
* :func:`parse_result_lines`: the guest's ``<device> key=value ...`` lines as a dict;
* :class:`EthernetEchoer`: sends ethertype-0x88B5 frames back (for ``net-echo``);
* :class:`TapNamespace` / :func:`echoing_tap`: a tap device in a private network
  namespace, ready before the VMM starts, with an echoer listening on it.

Pure Python; the network parts need root (CAP_NET_ADMIN), ``/dev/net/tun`` and ``ip``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

SECTOR_SIZE = 512
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

ECHO_ETHERTYPE = 0x88B5
ECHO_MAGIC = b"AVMMECHO"
#: Source MAC of echoed frames: locally administered, unicast.
ECHO_MAC = bytes.fromhex("020000000001")
GUEST_PREFIX = "avmm-testguest: "

_CLONE_NEWNET = 0x4000_0000
_NETNS_DIR = "/run/netns"
_PACKET_OUTGOING = 4


# ---- the blk pattern


def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (all arithmetic mod 2**64)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def blk_pattern(seed: int, sector: int) -> bytes:
    """Sector ``sector`` (512 bytes) of the ``blk-write`` pattern with ``avmm.seed=seed``.

    64 little-endian u64 words; word j is splitmix64(seed * 0x9E3779B97F4A7C15 +
    sector * 64 + j), everything mod 2**64.
    """
    base = (seed * _GOLDEN + sector * 64) & _MASK64
    return b"".join(splitmix64((base + j) & _MASK64).to_bytes(8, "little") for j in range(64))


def expected_pattern(seed: int, sectors: int, start: int = 0) -> bytes:
    """``sectors`` sectors of the pattern from sector ``start`` on: what a disk of that
    many sectors holds after ``avmm.test=blk-write avmm.seed=<seed>``."""
    return b"".join(blk_pattern(seed, s) for s in range(start, start + sectors))


# ---- guest output


def parse_result_lines(output: str) -> dict[str, dict[str, str | bool]]:
    """The guest's per-device lines, by device name.

    ``avmm-testguest: blk0 sectors=8192 crc32=5189d674`` becomes
    ``{"blk0": {"sectors": "8192", "crc32": "5189d674"}}``; a bare word maps to True
    (``blk1 readonly write=ioerr`` gives ``{"readonly": True, "write": "ioerr"}``,
    ``rng0 <hex>`` gives ``{"<hex>": True}``). Later lines for the same device add
    to (and override) earlier ones. Lines of other shapes are ignored.
    """
    results: dict[str, dict[str, str | bool]] = {}
    for line in output.splitlines():
        if not line.startswith(GUEST_PREFIX):
            continue
        words = line[len(GUEST_PREFIX) :].split()
        if len(words) < 2 or not re.fullmatch(r"(blk|net|rng)\d+", words[0]):
            continue
        fields = results.setdefault(words[0], {})
        for word in words[1:]:
            key, sep, value = word.partition("=")
            fields[key] = value if sep else True
    return results


# ---- network namespaces


def _enter_netns(netns: str) -> None:
    """Move the calling thread into network namespace ``netns`` (setns(2))."""
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({netns}): {os.strerror(error)}")
    finally:
        os.close(fd)


class EthernetEchoer:
    """Echo guest test frames on a network interface, from a background thread.

    Every frame of ethertype 0x88B5 that arrives on ``ifname`` goes back out of it with
    the destination set to the frame's source and the source set to :data:`ECHO_MAC`;
    the rest of the frame is unchanged. With ``netns`` the socket is opened inside that
    network namespace (the thread enters it; the rest of the process stays put).

    ``start()`` returns once the AF_PACKET socket is bound (errors are raised there);
    ``stop()`` ends the thread. The thread also ends by itself after ``lifetime``
    seconds, so a test that forgets to stop it does not leave it running for long.
    Use it as a context manager to get both.
    """

    def __init__(self, ifname: str, *, netns: str | None = None, lifetime: float = 120.0):
        self.ifname = ifname
        self.netns = netns
        self.lifetime = lifetime
        self.echoed = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EthernetEchoer:
        if self._thread is not None:
            raise RuntimeError("echoer already started")
        self._thread = threading.Thread(target=self._run, name=f"echoer-{self.ifname}", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            self._thread.join()
            raise self._error
        if not self._ready.is_set():
            self.stop()
            raise TimeoutError(f"echoer on {self.ifname} did not come up")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> EthernetEchoer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _open(self) -> socket.socket:
        if self.netns is not None:
            _enter_netns(self.netns)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ECHO_ETHERTYPE))
        try:
            sock.bind((self.ifname, ECHO_ETHERTYPE))
            sock.settimeout(0.1)
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        try:
            sock = self._open()
        except BaseException as e:  # handed to start()
            self._error = e
            self._ready.set()
            return
        deadline = time.monotonic() + self.lifetime
        with sock:
            self._ready.set()
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    frame, address = sock.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break  # the interface went away (namespace deleted)
                if self._answer(sock, frame, address[2]):
                    self.echoed += 1

    def _answer(self, sock: socket.socket, frame: bytes, packet_type: int) -> bool:
        """Echo ``frame`` if it is an echo-ethertype frame from the guest (not one of
        ours going out); True when echoed. Subclasses choose what to answer."""
        if packet_type == _PACKET_OUTGOING or len(frame) < 14:
            return False
        if int.from_bytes(frame[12:14], "big") != ECHO_ETHERTYPE:
            return False
        if frame[6:12] == ECHO_MAC:
            return False
        try:
            sock.send(frame[6:12] + ECHO_MAC + frame[12:])
        except OSError:
            return False  # e.g. no carrier yet; the guest will time out and say so
        return True


_names = itertools.count()


class TapNamespace:
    """A fresh network namespace holding a persistent tap device, both removed on exit.

    The tap exists (and is up) before the VMM starts, so nothing the guest sends is
    lost to a race with the test's setup. A VMM attaches to it from inside the
    namespace: run it under :meth:`command_prefix` (``ip netns exec NS ...``; QEMU's
    ``-netdev tap,ifname=...`` then opens this tap), or let it enter the namespace
    itself (avmm's ``netns`` option). Names are unique per process and call, so tests
    may run in parallel.
    """

    def __init__(self, tap: str = "avmmtap0") -> None:
        self.netns = f"avmm-test-{os.getpid()}-{next(_names)}"
        self.tap = tap
        self._created = False

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def __enter__(self) -> TapNamespace:
        self._ip("netns", "add", self.netns)
        self._created = True
        try:
            self._ip("-n", self.netns, "tuntap", "add", "dev", self.tap, "mode", "tap")
            self._ip("-n", self.netns, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._created:
            self._created = False
            # Deleting the namespace deletes the tap with it (once no fd holds it).
            subprocess.run(
                ["ip", "netns", "del", self.netns], check=False, capture_output=True, timeout=30
            )

    def command_prefix(self) -> list[str]:
        """Prepend to a command line to run it inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    def echoer(self, *, lifetime: float = 120.0) -> EthernetEchoer:
        """An (unstarted) echoer on this tap, inside this namespace."""
        return EthernetEchoer(self.tap, netns=self.netns, lifetime=lifetime)


@contextlib.contextmanager
def echoing_tap(*, lifetime: float = 120.0) -> Iterator[tuple[TapNamespace, EthernetEchoer]]:
    """A :class:`TapNamespace` with a running :class:`EthernetEchoer` on its tap."""
    with TapNamespace() as namespace, namespace.echoer(lifetime=lifetime) as echoer:
        yield namespace, echoer


def qemu_tap_netdev(ifname: str, netdev_id: str = "n0") -> str:
    """QEMU's ``-netdev`` value for an existing tap (run QEMU in its namespace)."""
    return f"tap,id={netdev_id},ifname={ifname},script=no,downscript=no,vnet_hdr=on"
