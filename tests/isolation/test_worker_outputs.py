"""The serial log and console socket of a VM in a worker: the daemon opens them
(:func:`avmm.isolation.worker_vm._open_outputs`) by the calls a VM of none mode makes, and
the worker's path policy hands them to the VM's build instead of opening the paths."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from avmm.config import BootConfig, ConsoleConfig, MachineConfig, SerialConfig, VmConfig
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
