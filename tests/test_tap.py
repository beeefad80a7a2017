"""The tap device wrapper against the real kernel: creating, attaching, the ioctls, the
error messages, and frames in both directions (seen through an AF_PACKET socket).

Needs root and /dev/net/tun: a missing prerequisite is a skip with the reason, or a
failure when AVMM_REQUIRE_KVM=1 (as the markers in conftest.py do for /dev/kvm).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from avmm.errors import AvmmError
from avmm.tap import Tap, TapError
from tests.prerequisites import net_problem, require

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_names = itertools.count()


@pytest.fixture
def tap_prerequisites() -> None:
    require(net_problem())


def unique_name() -> str:
    return f"avt{os.getpid() % 100000}t{next(_names)}"


def interface_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def bring_up(name: str) -> None:
    """Up, and quiet: no IPv6 so the kernel sends no router solicitations of its own."""
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


@pytest.fixture
def tap(tap_prerequisites: None) -> Iterator[Tap]:
    with Tap.open(unique_name()) as tap:
        yield tap


@pytest.fixture
def persistent_tap(tap_prerequisites: None) -> Iterator[str]:
    """A tap made beforehand with ip(8), as an administrator would."""
    name = unique_name()
    subprocess.run(["ip", "tuntap", "add", "mode", "tap", "name", name, "vnet_hdr"],
                   check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_open_creates_a_tap_that_goes_away_on_close(tap_prerequisites: None) -> None:
    name = unique_name()
    tap = Tap.open(name)
    try:
        assert tap.name == name
        assert interface_exists(name)
        flags = int(Path(f"/sys/class/net/{name}/tun_flags").read_text(), 16)
        assert flags & 0x5002 == 0x5002  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        assert os.get_blocking(tap.fd) is False
        assert tap.vnet_header_size == 12
        assert tap.offload == 0
    finally:
        tap.close()
    tap.close()  # idempotent
    assert tap.closed
    assert not interface_exists(name)


def test_open_without_a_name_lets_the_kernel_pick_one(tap_prerequisites: None) -> None:
    with Tap.open(None) as tap:
        assert tap.name.startswith("tap")
        assert interface_exists(tap.name)


def test_attach_to_an_existing_tap_leaves_it_in_place(persistent_tap: str) -> None:
    with Tap.open(persistent_tap) as tap:
        assert tap.name == persistent_tap
    assert interface_exists(persistent_tap)
    # And again: a persistent tap can be reattached after its user went away.
    with Tap.open(persistent_tap) as tap:
        assert tap.name == persistent_tap


def test_second_open_of_the_same_tap_is_busy(tap: Tap) -> None:
    with pytest.raises(TapError, match="busy") as info:
        Tap.open(tap.name)
    assert info.value.errno == errno.EBUSY


def test_name_of_another_kind_of_interface(tap_prerequisites: None) -> None:
    with pytest.raises(TapError, match="not a tap") as info:
        Tap.open("lo")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", ["a" * 16, "", "a/b", "a b", "x:1"])
def test_bad_names_are_rejected_before_the_kernel_sees_them(name: str) -> None:
    with pytest.raises(TapError) as info:
        Tap.open(name)
    assert isinstance(info.value, AvmmError)
    assert info.value.errno is None


def test_too_long_name_says_the_limit() -> None:
    with pytest.raises(TapError, match="at most 15 bytes"):
        Tap.open("x" * 20)


def test_header_size_below_the_kernel_minimum() -> None:
    with pytest.raises(TapError, match="smaller than"):
        Tap.open("avtx", vnet_header_size=8)


def _as_nobody(work: Callable[[], str]) -> str:
    """``work()``'s answer, run as nobody with no capabilities in a forked child."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (a thread cache of
        # an earlier test): the child only makes syscalls and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: drop to nobody, work, report through the pipe, exit
        status = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, work().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_without_privileges_the_error_says_what_to_do(tap_prerequisites: None) -> None:
    """As an unprivileged user (nobody, in a forked child), opening a tap fails with
    advice, not a bare OSError."""
    name = unique_name()

    def try_to_open() -> str:
        try:
            Tap.open(name).close()
            return "opened"
        except TapError as e:
            return f"TapError: {e}"

    message = _as_nobody(try_to_open)
    assert message.startswith("TapError:"), message
    assert "root" in message
    assert not interface_exists(name)


def test_frames_in_both_directions_carry_a_12_byte_header(tap: Tap) -> None:
    bring_up(tap.name)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((tap.name, 0))
        sock.settimeout(5)
        frame = bytes.fromhex("ffffffffffff 020000000001 88b5") + b"avmm tap test".ljust(46)

        # Userspace -> kernel: written to the tap fd, the interface receives it.
        assert os.write(tap.fd, bytes(12) + frame) == 12 + len(frame)
        while True:
            data, address = sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING and data == frame:
                break

        # Kernel -> userspace: sent on the interface, the tap fd reads header + frame.
        sock.send(frame)
        os.set_blocking(tap.fd, True)
        try:
            while True:
                data = os.read(tap.fd, 65536)
                if data[12:] == frame:
                    break
        finally:
            os.set_blocking(tap.fd, False)
        assert data[1] == 0  # gso_type NONE: no offloads enabled
        with pytest.raises(BlockingIOError):
            os.read(tap.fd, 65536)


def test_set_offload_on_a_closed_tap_is_a_tap_error(tap_prerequisites: None) -> None:
    tap = Tap.open(unique_name())
    tap.set_offload(1)  # TUN_F_CSUM
    assert tap.offload == 1
    tap.close()
    with pytest.raises(TapError):
        tap.set_offload(0)


def test_an_attached_taps_ioctls_need_no_privilege(tap: Tap) -> None:
    """What a jailed worker does with the tap its daemon opened, after it dropped every
    capability (as nobody, in a forked child): offloads and the header size change,
    a second attach does not."""
    import fcntl
    import struct

    from avmm.tap import TUN_F_CSUM, TUNSETVNETHDRSZ

    def try_each() -> str:
        handed = Tap.handed_over(tap.fd, tap.name)
        results = []
        for name, call in (
                ("offload", lambda: handed.set_offload(TUN_F_CSUM)),
                ("hdrsz", lambda: fcntl.ioctl(handed.fd, TUNSETVNETHDRSZ,
                                              struct.pack("=i", 10))),
                ("offload0", lambda: handed.set_offload(0)),
                ("open", lambda: Tap.open(tap.name))):
            try:
                call()
                results.append(f"{name}=ok")
            except (OSError, TapError):
                results.append(f"{name}=refused")
        return " ".join(results)

    message = _as_nobody(try_each)
    assert message == "offload=ok hdrsz=ok offload0=ok open=refused", message
