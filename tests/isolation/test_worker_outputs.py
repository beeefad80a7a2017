"""The serial log and console socket of a VM in a worker: the daemon opens them
(:func:`avmm.isolation.worker_vm._open_outputs`) by the calls a VM of none mode makes, and
the worker's path policy hands them to the VM's build instead of opening the paths. The
same for the NICs' taps (opened in their network namespaces)."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from avmm.config import (
    BootConfig,
    ConfigError,
    ConsoleConfig,
    MachineConfig,
    SerialConfig,
    VmConfig,
)
from avmm.errors import HostFileError, PathNotAllowedError, VmStartError
from avmm.isolation.worker_vm import _close_outputs, _open_outputs
from avmm.paths import BoundSocket, PathPolicy


def _config(serial: SerialConfig, console: ConsoleConfig | None = None) -> VmConfig:
    return VmConfig(machine=MachineConfig(), boot=BootConfig(kernel=Path("/boot/vmlinux")),
                    serial=serial, console=console)


def test_the_daemon_opens_and_binds_them_as_none_mode_does(tmp_path: Path) -> None:
    log, sock = tmp_path / "serial.log", tmp_path / "console.sock"
    log.write_text("old")
    opened = _open_outputs("vm", _config(SerialConfig("file", log),
                                         ConsoleConfig("socket", sock)), None)
    try:
        assert list(opened) == ["serial.path", "console.path"]
        assert log.read_text() == ""  # truncated
        assert isinstance(opened["serial.path"], int)
        assert isinstance(opened["console.path"], BoundSocket)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        _close_outputs(opened)
    assert not sock.exists()
    assert _open_outputs("vm", _config(SerialConfig("none")), None) == {}


def test_a_worker_is_handed_no_character_device_but_the_harmless_ones() -> None:
    """/dev/null is fine; /dev/kmsg (or /dev/port, /dev/mem) would hand a jailed
    process what its jail keeps from it: refused, naming the key, nothing left open."""
    opened = _open_outputs("vm", _config(SerialConfig("file", Path("/dev/null"))), None)
    try:
        assert os.major(os.fstat(opened["serial.path"]).st_rdev) == 1
    finally:
        _close_outputs(opened)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(VmStartError) as failed:
        _open_outputs("vm", _config(SerialConfig("file", Path("/dev/kmsg"))), None)
    assert isinstance(failed.value.error, ConfigError), failed.value
    assert failed.value.error.key == "serial.path"
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_bad_output_fails_as_the_vms_build_would(tmp_path: Path) -> None:
    """A path swapped after the config was checked: the step and the key, as none
    mode's build says them; nothing is left open or made."""
    log = tmp_path / "serial.log"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    long_path = tmp_path / ("s" * 110)
    for bad, key, step in (
            (_config(SerialConfig("file", fifo)), "serial.path", "setting up the serial port"),
            (_config(SerialConfig("file", log), ConsoleConfig("file", fifo)),
             "console.path", "setting up the virtio console"),
            (_config(SerialConfig("file", log), ConsoleConfig("socket", precious)),
             "console.path", "setting up the virtio console"),
            (_config(SerialConfig("none"), ConsoleConfig("socket", long_path)),
             "console.path", "setting up the virtio console")):
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(VmStartError) as failed:
            _open_outputs("vm", bad, None)
        assert failed.value.step == step, failed.value
        assert isinstance(failed.value.error, HostFileError), failed.value
        assert failed.value.error.key == key
        assert f"{step}: {key}: " in str(failed.value)
        assert set(os.listdir("/proc/self/fd")) == before
    assert precious.read_text() == "keep me"
    assert not long_path.exists()

    (tmp_path / "allowed").mkdir()
    policy = PathPolicy([tmp_path / "allowed"])
    try:
        with pytest.raises(VmStartError) as failed:
            _open_outputs("vm", _config(SerialConfig("file", log)), policy)
        assert isinstance(failed.value.error, PathNotAllowedError)  # the API's 403
    finally:
        policy.close()


def test_a_policy_hands_over_what_was_opened_once(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handed = BoundSocket.handed_over(listener, tmp_path / "console.sock")
    policy = PathPolicy(opened={"serial.path": fd, "console.path": handed})
    assert policy.open_output(Path("/nowhere/serial.log"), "serial.path") == fd
    assert policy.bind_socket(Path("/nowhere/console.sock"), "console.path") is handed
    # Taken: the next ones open the path as usual.
    with pytest.raises(HostFileError):
        policy.open_output(Path("/nowhere/serial.log"), "serial.path")
    policy.close()
    os.fstat(fd)  # the caller's now: not closed by the policy
    handed.close()  # a handed-over socket's file is not this side's to remove
    os.close(fd)
    unused = os.open(log, os.O_WRONLY)
    PathPolicy(opened={"serial.path": unused}).close()
    with pytest.raises(OSError):
        os.fstat(unused)


def _tap_name(fd: int) -> str:
    """The name of the tap attached to ``fd`` (TUNGETIFF: no privilege needed)."""
    import fcntl

    reply = fcntl.ioctl(fd, 0x800454D2, bytes(40))  # TUNGETIFF
    return reply[:16].split(b"\0", 1)[0].decode()


def test_the_daemon_opens_a_workers_taps_in_their_namespaces() -> None:
    """Each tap NIC's tap, opened as none mode's build opens it (in the NIC's network
    namespace), by key ``net[N].tap``; a vhost-user NIC has none."""
    from avmm.config import NetConfig
    from tests.prerequisites import net_problem, require
    from tests.virtio_guest_support import TapNamespace

    require(net_problem())
    with TapNamespace("avmmpt0") as blue, TapNamespace("avmmpt1") as red:
        config = dataclasses.replace(
            _config(SerialConfig("none")),
            nets=(NetConfig(tap=blue.tap, netns=blue.netns),
                  NetConfig(vhost_user=Path("/run/nowhere/net.sock")),
                  NetConfig(tap=red.tap, netns=red.netns)))
        opened = _open_outputs("vm", config, None)
        try:
            assert list(opened) == ["net[0].tap", "net[2].tap"]
            for key, name in (("net[0].tap", blue.tap), ("net[2].tap", red.tap)):
                fd = opened[key]
                assert isinstance(fd, int)
                assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun"
                assert _tap_name(fd) == name
        finally:
            _close_outputs(opened)


def test_a_bad_tap_fails_as_the_vms_build_would_and_leaves_nothing(tmp_path: Path) -> None:
    """An interface that is not a tap, a namespace that does not exist: none mode's step
    and message; what was opened before (a serial log, another tap, one the open
    created) is closed (gone)."""
    from avmm.config import NetConfig
    from avmm.netns import NetnsError
    from avmm.tap import TapError
    from avmm.vm import open_tap
    from tests.prerequisites import net_problem, require
    from tests.virtio_guest_support import TapNamespace

    require(net_problem())
    log = tmp_path / "serial.log"
    with TapNamespace("avmmpt2") as blue:
        created = NetConfig(tap="avmmptnew", netns=blue.netns)  # made by the open
        for bad, error in ((NetConfig(tap="lo", netns=blue.netns), TapError),
                           (NetConfig(tap="avmmpt3", netns="avmm-no-such-ns"), NetnsError)):
            config = dataclasses.replace(
                _config(SerialConfig("file", log)),
                nets=(NetConfig(tap=blue.tap, netns=blue.netns), created, bad))
            before = set(os.listdir("/proc/self/fd"))
            with pytest.raises(VmStartError) as failed:
                _open_outputs("vm", config, None)
            assert set(os.listdir("/proc/self/fd")) == before
            assert failed.value.step == f"opening tap {bad.tap!r} for net2", failed.value
            assert isinstance(failed.value.error, error), failed.value
            with pytest.raises(error) as direct:  # none mode's build calls open_tap too
                open_tap(bad)
            assert str(failed.value) == f"cannot start VM 'vm': {failed.value.step}: " \
                f"{direct.value}"
            # The tap the daemon created is gone with its fd; the one made beforehand
            # is free again.
            listed = subprocess.run(["ip", "-n", blue.netns, "-o", "link"], check=True,
                                    capture_output=True, text=True).stdout
            assert "avmmptnew" not in listed and blue.tap in listed, listed
            open_tap(NetConfig(tap=blue.tap, netns=blue.netns)).close()


def test_a_policy_hands_over_a_tap_once() -> None:
    read_end, write_end = os.pipe()
    policy = PathPolicy(opened={"net[0].tap": read_end, "net[1].tap": write_end})
    assert policy.take_opened("net[0].tap") == read_end
    assert policy.take_opened("net[0].tap") is None  # taken: the build opens it as usual
    assert policy.take_opened("net[5].tap") is None
    policy.close()
    os.fstat(read_end)  # the caller's now
    os.close(read_end)
    with pytest.raises(OSError):
        os.fstat(write_end)  # never asked for: closed by the policy
