"""virtio-net's offloads against a real tap and the host's own IP stack: what the driver
negotiates is what the tap is told (TUNSETOFFLOAD) and what the device passes on, in
both directions, on both inner loops (C and Python).

* Transmit: a UDP datagram with a wrong checksum reaches a host socket only when the
  driver negotiated VIRTIO_NET_F_CSUM and asked for the checksum (NEEDS_CSUM): the host
  then takes it as the NIC's to fill in. Without the feature the device sends a zero
  header and the host drops the datagram for its checksum. A TCP segment of several MSS
  with a GSO header goes out whole only with HOST_TSO4.
* Receive: with GUEST_CSUM the host hands the tap datagrams whose checksum it has not
  computed (NEEDS_CSUM, csum_start/csum_offset in the header), and the guest sees that
  header; without it the guest gets complete checksums and a header of zeros.

The tap lives in the host's network namespace with a private address (as test_net.py's
taps do), needs root and /dev/net/tun, and is deleted after each test.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from avmm.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap
from avmm.virtio.net import (
    NET_HEADER_SIZE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    NetDevice,
)

from .test_net import HEADER, MAC, Guest, Wire, running, until

#: Every test on both inner loops (C and Python; tests/virtio/inner_loops.py).
pytestmark = pytest.mark.usefixtures("net_path")

_SUBNET = 77 + os.getpid() % 100
HOST_IP = f"10.{_SUBNET}.91.1"
GUEST_IP = f"10.{_SUBNET}.91.2"
ETH_IPV4 = b"\x08\x00"
NEEDS_CSUM = 1
GSO_TCPV4 = 1


@pytest.fixture
def addressed(tap: Tap) -> Iterator[bytes]:
    """The tap with HOST_IP and the guest's MAC as GUEST_IP's neighbour; the tap's MAC."""
    subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap.name], check=True)
    subprocess.run(["ip", "neigh", "replace", GUEST_IP, "lladdr", MAC.hex(":"),
                    "dev", tap.name, "nud", "permanent"], check=True)
    with open(f"/sys/class/net/{tap.name}/address") as f:
        yield bytes.fromhex(f.read().strip().replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(protocol: int, payload: bytes, source: str, destination: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64,
                         protocol, 0, socket.inet_aton(source), socket.inet_aton(destination))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def udp_frame(destination_mac: bytes, port: int, payload: bytes, udp_checksum: int) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), udp_checksum) + payload
    return destination_mac + MAC + ETH_IPV4 + ipv4(17, udp, GUEST_IP, HOST_IP)


def host_socket(type_: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, type_)
    sock.bind((HOST_IP, 0))
    sock.setblocking(False)
    return sock


async def datagrams(sock: socket.socket, count: int) -> list[bytes]:
    out = []
    with trio.fail_after(5):
        while len(out) < count:
            await trio.lowlevel.wait_readable(sock)
            out.append(sock.recv(4096))
    return out


@pytest.mark.parametrize("negotiated", [True, False])
async def test_a_checksum_left_to_the_host_arrives_only_when_negotiated(
        tap: Tap, addressed: bytes, negotiated: bool) -> None:
    guest = Guest(features=VIRTIO_NET_F_CSUM if negotiated else 0)
    device = NetDevice(tap, mac=MAC)
    with host_socket(socket.SOCK_DGRAM) as sock:
        port = sock.getsockname()[1]
        # csum_start: the UDP header (14 + 20); csum_offset: its checksum field.
        partial = HEADER.pack(NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
        async with running(device, guest.context):
            guest.send(udp_frame(addressed, port, b"left to the host", 0xBAD0), partial)
            # A datagram without a checksum (0: none, IPv4) marks the end.
            guest.send(udp_frame(addressed, port, b"marker", 0))
            expected = [b"left to the host", b"marker"] if negotiated else [b"marker"]
            assert await datagrams(sock, len(expected)) == expected
            await until(lambda: guest.tx.used_idx == 2)
    assert device.stats.tx_frames == 2 and device.stats.tx_dropped == 0


@pytest.mark.parametrize("negotiated", [True, False])
async def test_a_segmentation_offload_frame_goes_out_whole_only_when_negotiated(
        tap: Tap, addressed: bytes, wire: Wire, negotiated: bool) -> None:
    features = VIRTIO_NET_F_CSUM | (VIRTIO_NET_F_HOST_TSO4 if negotiated else 0)
    guest = Guest(features=features)
    device = NetDevice(tap, mac=MAC)
    mss = 1448
    payload = os.urandom(4 * mss)
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    segment = addressed + MAC + ETH_IPV4 + ipv4(6, tcp, GUEST_IP, HOST_IP)
    header = HEADER.pack(NEEDS_CSUM, GSO_TCPV4, 54, mss, 34, 16, 0)
    async with running(device, guest.context):
        guest.send(segment, header)
        await until(lambda: guest.tx.used_idx == 1)
        if negotiated:
            # The host's side sees the whole segment, one frame (it segments it only
            # where it must forward it).
            with trio.fail_after(5):
                while True:
                    await trio.lowlevel.wait_readable(wire.socket)
                    data = wire.socket.recv(1 << 17)
                    if data[12:14] == ETH_IPV4 and data[26:30] == socket.inet_aton(GUEST_IP):
                        break
            assert data[34:38] == tcp[:4] and len(data) == len(segment)
    assert (device.stats.tx_frames, device.stats.tx_dropped) == (
        (1, 0) if negotiated else (0, 1))


@pytest.mark.parametrize("negotiated", [True, False])
async def test_the_guest_gets_the_hosts_checksum_request_only_when_negotiated(
        tap: Tap, addressed: bytes, negotiated: bool) -> None:
    features = VIRTIO_NET_F_MRG_RXBUF | (VIRTIO_NET_F_GUEST_CSUM if negotiated else 0)
    guest = Guest(features=features)
    device = NetDevice(tap, mac=MAC)
    payload = b"from the host"
    with host_socket(socket.SOCK_DGRAM) as sock:
        async with running(device, guest.context):
            guest.give_buffers(*[2048] * 8)
            await trio.testing.wait_all_tasks_blocked()
            assert tap.offload == (TUN_F_CSUM if negotiated else 0)
            sock.sendto(payload, (GUEST_IP, 9))

            found: list[bytes] = []

            def datagram() -> bool:
                # The kernel may send something of its own first (an IGMP report);
                # used() hands each entry out once.
                for head, length in guest.rx.used():
                    data = guest.rx.writable_data(head, length)
                    if data[NET_HEADER_SIZE + 12:NET_HEADER_SIZE + 14] == ETH_IPV4 and (
                            data.endswith(payload)):
                        found.append(data)
                return bool(found)

            await until(datagram)
    data = found[0]
    flags, gso, _, _, csum_start, csum_offset, buffers = HEADER.unpack(data[:NET_HEADER_SIZE])
    frame_data = data[NET_HEADER_SIZE:]
    assert frame_data.endswith(payload) and gso == 0 and buffers == 1
    udp = frame_data[34:]
    if negotiated:
        # The checksum is the guest's to finish (a NIC's, in the end), as the header says.
        assert flags & NEEDS_CSUM and (csum_start, csum_offset) == (34, 6)
    else:
        assert (flags, csum_start, csum_offset) == (0, 0, 0)
        pseudo = (frame_data[26:34] + b"\0\x11" + struct.pack("!H", len(udp)))
        assert checksum(pseudo + udp) == 0, "the datagram's checksum is complete"


async def test_the_tap_is_told_what_the_driver_took(tap: Tap) -> None:
    """TUNSETOFFLOAD follows the negotiated features (a TSO feature without the
    checksum feature it needs counts for nothing), each time the device starts; a reset
    does not touch the tap (it may complete on a vCPU thread, whose filter has no tap
    ioctl), the next start does."""
    for features, expected in (
            (VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6,
             TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6, 0),
            (VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6, TUN_F_CSUM | TUN_F_TSO6),
            (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4, 0)):
        guest = Guest(features=features)
        device = NetDevice(tap, mac=MAC)
        async with running(device, guest.context):
            await trio.testing.wait_all_tasks_blocked()
            assert tap.offload == expected, hex(features)
        device.reset()
        assert tap.offload == expected  # untouched until the next start
    async with running(NetDevice(tap, mac=MAC), Guest(features=0).context):
        await trio.testing.wait_all_tasks_blocked()
        assert tap.offload == 0
