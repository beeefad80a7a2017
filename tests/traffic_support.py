"""The test guest's ``net-echo`` and ``blk-write`` driven from the host, for the tests
that stop a VM in the middle of its traffic and let it go on elsewhere (a snapshot
restored, tests/snapshot; a live migration, tests/migration): the NIC and disk they
give it, the back-ends that serve the disk, and how they pick the moment to stop."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from avmm import VirtualMachine
from avmm.config import DiskConfig, NetConfig, VmConfig
from tests.prerequisites import require
from tests.vhost.test_frontend import avmm_backend, subprocess_backend
from tests.virtio_guest_support import (
    _PACKET_OUTGOING,
    ECHO_ETHERTYPE,
    ECHO_MAGIC,
    EthernetEchoer,
    TapNamespace,
)
from tests.virtio_guest_support import ECHO_MAC as ECHOER_MAC
from tests.vm.helpers import MAILBOX_ADDRESS

#: The guest's progress in its mailbox: frames echoed back to it (net-echo), sectors
#: written (blk-write).
PROGRESS = MAILBOX_ADDRESS + 8
ECHO_FRAMES = 200
#: Frames of the net-echo runs that :func:`pause_with_no_echo_on_its_way` pauses: an echo
#: takes 80 to 300 µs here, so 200 frames left the guest 15 to 55 ms between its 10th frame and
#: its end, which a loaded host's polling and the pause's tries (each resumes the guest
#: for a while) can use up; 2,000 leave it about ten times as long.
PAUSED_ECHO_FRAMES = 2000
ECHO_MAC = bytes.fromhex("525400abcdef")
BLK_SECTORS = 8 * 2048  # 8 MiB: the guest writes it, then reads it all back


class SequenceEchoer(EthernetEchoer):
    """An :class:`EthernetEchoer` that also notes the sequence number of every net-echo
    frame it gets (``seen``, in arrival order, resends included), holds each echo back
    ``delay_s`` (so that the guest, always waiting for one, most likely has a frame or
    its echo on the way at any moment), and answers none of the first copies of the
    frames in ``drop_first`` (a frame lost once, as on any network)."""

    def __init__(self, ifname: str, *, netns: str | None = None, lifetime: float = 120.0,
                 delay_s: float = 0.0, drop_first: frozenset[int] = frozenset()) -> None:
        super().__init__(ifname, netns=netns, lifetime=lifetime)
        self.delay_s = delay_s
        self.drop_first = drop_first
        self.seen: list[int] = []
        self._seen_lock = threading.Lock()

    def sequences(self) -> list[int]:
        """A copy of ``seen`` (the thread goes on appending)."""
        with self._seen_lock:
            return list(self.seen)

    def _answer(self, sock: socket.socket, frame: bytes, packet_type: int) -> bool:
        """Echo ``frame`` if it is a net-echo frame of the guest's (not one of ours
        going out, not a first copy to drop); True when echoed."""
        if (packet_type == _PACKET_OUTGOING or len(frame) < 26
                or int.from_bytes(frame[12:14], "big") != ECHO_ETHERTYPE
                or frame[6:12] == ECHOER_MAC or frame[14:22] != ECHO_MAGIC):
            return False
        seq = int.from_bytes(frame[22:26], "little")
        with self._seen_lock:
            first = seq not in self.seen
            self.seen.append(seq)
        if first and seq in self.drop_first:
            return False
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            sock.send(frame[6:12] + ECHOER_MAC + frame[12:])
        except OSError:
            return False  # e.g. no carrier yet; the guest resends or says it timed out
        return True


def net_echo(config: VmConfig, namespace: TapNamespace) -> VmConfig:
    """``config`` with the NIC net-echo uses, on ``namespace``'s tap."""
    return dataclasses.replace(config, nets=(NetConfig(
        tap=namespace.tap, mac=ECHO_MAC, netns=namespace.netns),))


async def pause_with_no_echo_on_its_way(vm: VirtualMachine, echoer: EthernetEchoer) -> int:
    """Pause ``vm`` (running net-echo) at a moment when no echo is on its way: frames in
    flight on the host side are part of no snapshot or migration, and the guest never
    resends. Once the guest has 10 frames back, pause, give the echoer a moment to answer
    what reached it, and stay paused if it has answered exactly the frames the guest
    received (else run a little and try again). Returns that number of frames."""
    assert vm.memory is not None
    while True:
        while vm.memory.read_u64(PROGRESS) < 10:
            await trio.sleep(0.005)
        await vm.pause()
        await trio.sleep(0.1)  # the echoer answers what reached it
        received = vm.memory.read_u64(PROGRESS)
        if echoer.echoed == received:
            return received
        await vm.resume()
        await trio.sleep(0.003)


def blank_image(path: Path, sectors: int = BLK_SECTORS) -> Path:
    """A zeroed disk image of ``sectors`` sectors for blk-write."""
    path.write_bytes(bytes(sectors * 512))
    return path


def blk_disk(kind: str, image: Path, sock: Path) -> DiskConfig:
    """The disk of a ``kind`` :func:`blk_served` serves: the image itself ("file") or
    the back-end's socket."""
    return DiskConfig(path=image) if kind == "file" else DiskConfig(vhost_user=sock)


@contextlib.contextmanager
def blk_served(kind: str, image: Path, sock: Path, *, shared: bool = False,
               options: Sequence[str] = ()) -> Iterator[None]:
    """``image`` served at ``sock`` while inside: "file" (avmm opens the image itself:
    nothing to run), "avmm" (``avmm backend blk`` with ``options``) or "qsd"
    (qemu-storage-daemon; ``shared``: without its lock on the image, for a second daemon
    on the same one)."""
    if kind == "file":
        yield
    elif kind == "avmm":
        with avmm_backend("blk", sock, "--image", str(image), *options):
            yield
    else:
        if shutil.which("qemu-storage-daemon") is None:
            require("qemu-storage-daemon is not installed (make deps installs "
                    "qemu-system-x86)")
        locking = ",locking=off" if shared else ""
        with subprocess_backend(
                ["qemu-storage-daemon", "--blockdev",
                 f"driver=file,node-name=file,filename={image}{locking}",
                 "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
                 f"addr.path={sock},writable=on"], sock):
            yield


async def wait_for_sectors(vm: VirtualMachine, low: int, high: int) -> int:
    """Wait until blk-write has written at least ``low`` and fewer than ``high`` sectors
    (the caller bounds the time); returns the count then."""
    assert vm.memory is not None
    while not low <= (written := vm.memory.read_u64(PROGRESS)) < high:
        await trio.sleep(0.002)
    return written
