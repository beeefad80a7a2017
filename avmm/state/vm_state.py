"""The VM-level sections of a snapshot: the config the VM was built from and the state of
its legacy devices, as plain versioned data (see :mod:`avmm.state.codec`).

The config is saved field by field, not as the live :class:`~avmm.config.VmConfig`
(paths become strings, tuples lists), and :func:`config_from_state` checks every field
again on the way back: a state file is input like any other, and its SHA-256 only
proves it is whole, not that avmm wrote it. The files the config names are not checked
here; the VM recipe opens each through its :class:`~avmm.paths.PathPolicy` as for any
config. ``boot`` is kept for the record only: a restored VM loads no kernel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import (
    CONSOLE_MODES,
    CPU_PROFILES,
    DISK_ID_MAX_BYTES,
    MAX_VIRTIO_DEVICES,
    MEMORY_MIB_MAX,
    MEMORY_MIB_MIN,
    SERIAL_MODES,
    TAP_NAME_MAX,
    UNIX_SOCKET_PATH_MAX,
    VCPUS_MAX,
    BootConfig,
    ConsoleConfig,
    DiskConfig,
    MachineConfig,
    NetConfig,
    RngConfig,
    SerialConfig,
    VhostUserConfig,
    VmConfig,
)
from ..devices.acpi_sleep import AcpiSleepState
from ..devices.boot_timer import BootTimerState
from ..devices.debug_exit import DebugExitState
from ..devices.i8042 import I8042State
from ..devices.serial import Serial8250State
from ..vm_virtio import VirtioSlotState
from ._errors import SnapshotError
from .codec import U32

#: Longest string accepted for any config field that is not a path or the command line.
_SHORT_MAX = 256
#: Longest path accepted (PATH_MAX).
_PATH_MAX = 4096
_CMDLINE_MAX = 65535


@dataclass(frozen=True)
class MachineConfigState:
    vcpus: U32
    memory_mib: U32
    cpu_profile: str
    hide_cpu_features: list[str]
    acpi: bool


@dataclass(frozen=True)
class BootConfigState:
    kernel: str
    initrd: str | None
    cmdline: str


@dataclass(frozen=True)
class OutputConfigState:
    """The serial port's or the virtio console's ``mode`` and ``path``."""

    mode: str
    path: str | None


@dataclass(frozen=True)
class DiskConfigState:
    path: str | None
    readonly: bool
    id: str | None
    vhost_user: str | None


@dataclass(frozen=True)
class NetConfigState:
    tap: str | None
    mac: bytes | None
    netns: str | None
    vhost_user: str | None


@dataclass(frozen=True)
class VhostUserConfigState:
    socket: str
    device_id: U32
    num_queues: U32
    queue_size: U32


@dataclass(frozen=True)
class ConfigState:
    """The :class:`~avmm.config.VmConfig` a snapshotted VM was built from."""

    STATE_VERSION: ClassVar[int] = 1

    name: str | None
    machine: MachineConfigState
    boot: BootConfigState
    serial: OutputConfigState
    disks: list[DiskConfigState]
    nets: list[NetConfigState]
    rng: bool
    console: OutputConfigState | None
    vhost_users: list[VhostUserConfigState]


@dataclass(frozen=True)
class LegacyDevicesState:
    """Each legacy device's own state (see :mod:`avmm.devices._state`); ``acpi_sleep``
    is None for a VM without ACPI."""

    STATE_VERSION: ClassVar[int] = 1

    serial: Serial8250State
    i8042: I8042State
    debug_exit: DebugExitState
    boot_timer: BootTimerState
    acpi_sleep: AcpiSleepState | None


@dataclass(frozen=True)
class VirtioDevicesState:
    """Every virtio-mmio slot's state (transport and device), in placement order."""

    STATE_VERSION: ClassVar[int] = 1

    slots: list[VirtioSlotState]


def _str(path: Path | None) -> str | None:
    return None if path is None else os.fspath(path)


def config_to_state(config: VmConfig) -> ConfigState:
    """The plain-data form of ``config``."""
    machine = config.machine
    return ConfigState(
        name=config.name,
        machine=MachineConfigState(vcpus=machine.vcpus, memory_mib=machine.memory_mib,
                                   cpu_profile=machine.cpu_profile,
                                   hide_cpu_features=list(machine.hide_cpu_features),
                                   acpi=machine.acpi),
        boot=BootConfigState(kernel=os.fspath(config.boot.kernel),
                             initrd=_str(config.boot.initrd), cmdline=config.boot.cmdline),
        serial=OutputConfigState(mode=config.serial.mode, path=_str(config.serial.path)),
        disks=[DiskConfigState(path=_str(d.path), readonly=d.readonly, id=d.id,
                               vhost_user=_str(d.vhost_user)) for d in config.disks],
        nets=[NetConfigState(tap=n.tap, mac=n.mac, netns=n.netns,
                             vhost_user=_str(n.vhost_user)) for n in config.nets],
        rng=config.rng is not None,
        console=None if config.console is None else OutputConfigState(
            mode=config.console.mode, path=_str(config.console.path)),
        vhost_users=[VhostUserConfigState(socket=os.fspath(v.socket), device_id=v.device_id,
                                          num_queues=v.num_queues, queue_size=v.queue_size)
                     for v in config.vhost_users],
    )


class _Checker:
    """Raises one SnapshotError line naming the config key that does not fit."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, why: str) -> SnapshotError:
        return SnapshotError(f"{self.source}: saved config {key}: {why}")

    def text(self, key: str, value: str | None, max_bytes: int = _SHORT_MAX) -> str | None:
        if value is None:
            return None
        if "\0" in value or len(value.encode()) > max_bytes:
            raise self.fail(key, f"not a string of at most {max_bytes} bytes without NUL")
        return value

    def path(self, key: str, value: str | None, max_bytes: int = _PATH_MAX) -> Path | None:
        if value is None:
            return None
        self.text(key, value, max_bytes)
        if not os.path.isabs(value):
            raise self.fail(key, f"{value!r:.80} is not an absolute path")
        return Path(value)

    def number(self, key: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            raise self.fail(key, f"{value} is outside {low}..{high}")
        return value

    def choice(self, key: str, value: str, options: tuple[str, ...]) -> Any:
        if value not in options:
            raise self.fail(key, f"{value!r:.40} is not one of {', '.join(options)}")
        return value


def config_from_state(state: ConfigState, *, source: str,
                      vhost_user: Mapping[str, str] | None = None) -> VmConfig:
    """The :class:`VmConfig` ``state`` describes, every field checked; ``vhost_user``
    replaces the socket of vhost-user devices by device name (``blk0``, ``net1``,
    ``vhost0``: the names avmm gives them, in config order).

    :raises SnapshotError: a field avmm could not have saved, or a ``vhost_user`` name
        that is no vhost-user device of this VM.
    """
    from ..arch.x86.cpuid import FEATURES

    check = _Checker(source)
    replacements = dict(vhost_user or {})
    used: set[str] = set()

    def socket(name: str, key: str, saved: str | None) -> Path | None:
        if saved is None:
            return None
        if name in replacements:
            used.add(name)
            return check.path(f"vhost_user[{name!r}]", replacements[name],
                              UNIX_SOCKET_PATH_MAX)
        return check.path(key, saved, UNIX_SOCKET_PATH_MAX)

    m = state.machine
    for feature in m.hide_cpu_features:
        check.choice("machine.hide_cpu_features", feature, tuple(sorted(FEATURES)))
    machine = MachineConfig(
        vcpus=check.number("machine.vcpus", m.vcpus, 1, VCPUS_MAX),
        memory_mib=check.number("machine.memory_mib", m.memory_mib, MEMORY_MIB_MIN,
                                MEMORY_MIB_MAX),
        cpu_profile=check.choice("machine.cpu_profile", m.cpu_profile, CPU_PROFILES),
        hide_cpu_features=tuple(m.hide_cpu_features),
        acpi=m.acpi,
    )
    kernel = check.path("boot.kernel", state.boot.kernel)
    assert kernel is not None
    boot = BootConfig(kernel=kernel, initrd=check.path("boot.initrd", state.boot.initrd),
                      cmdline=check.text("boot.cmdline", state.boot.cmdline,
                                         _CMDLINE_MAX) or "")
    serial_mode = check.choice("serial.mode", state.serial.mode, SERIAL_MODES)
    serial_path = check.path("serial.path", state.serial.path)
    if (serial_mode == "file") != (serial_path is not None):
        raise check.fail("serial.path", "set exactly when serial.mode is \"file\"")
    count = (len(state.disks) + len(state.nets) + len(state.vhost_users) + state.rng
             + (state.console is not None))
    if count > MAX_VIRTIO_DEVICES:
        raise check.fail("disk", f"{count} virtio devices; at most {MAX_VIRTIO_DEVICES}")
    disks = []
    for index, d in enumerate(state.disks):
        key = f"disk[{index}]"
        disk = DiskConfig(path=check.path(f"{key}.path", d.path), readonly=d.readonly,
                          id=check.text(f"{key}.id", d.id, DISK_ID_MAX_BYTES),
                          vhost_user=socket(f"blk{index}", f"{key}.vhost_user", d.vhost_user))
        if (disk.path is None) == (disk.vhost_user is None):
            raise check.fail(key, "needs exactly one of path and vhost_user")
        disks.append(disk)
    nets = []
    for index, n in enumerate(state.nets):
        key = f"net[{index}]"
        if n.mac is not None and len(n.mac) != 6:
            raise check.fail(f"{key}.mac", f"{len(n.mac)} bytes, a MAC has 6")
        net = NetConfig(tap=check.text(f"{key}.tap", n.tap, TAP_NAME_MAX), mac=n.mac,
                        netns=check.text(f"{key}.netns", n.netns),
                        vhost_user=socket(f"net{index}", f"{key}.vhost_user", n.vhost_user))
        if (net.tap is None) == (net.vhost_user is None):
            raise check.fail(key, "needs exactly one of tap and vhost_user")
        nets.append(net)
    generic = []
    for index, v in enumerate(state.vhost_users):
        key = f"vhost_user[{index}]"
        path = socket(f"vhost{index}", f"{key}.socket", v.socket)
        assert path is not None
        size = check.number(f"{key}.queue_size", v.queue_size, 1, 32768)
        if size & (size - 1):
            raise check.fail(f"{key}.queue_size", f"{size} is not a power of two")
        generic.append(VhostUserConfig(
            socket=path, device_id=check.number(f"{key}.device_id", v.device_id, 1, 0xFFFF),
            num_queues=check.number(f"{key}.num_queues", v.num_queues, 1, 64),
            queue_size=size))
    console = None
    if state.console is not None:
        mode = check.choice("console.mode", state.console.mode, CONSOLE_MODES)
        path = check.path("console.path", state.console.path)
        if (mode != "console") != (path is not None):
            raise check.fail("console.path", "set exactly when console.mode is \"file\" "
                             "or \"socket\"")
        console = ConsoleConfig(mode=mode, path=path)
    unused = sorted(set(replacements) - used)
    if unused:
        raise SnapshotError(f"{source}: vhost_user names {unused[0]!r}, which is no "
                            "vhost-user device of the saved VM")
    return VmConfig(machine=machine, boot=boot,
                    serial=SerialConfig(mode=serial_mode, path=serial_path),
                    source=source, name=check.text("name", state.name, 64),
                    disks=tuple(disks), nets=tuple(nets),
                    rng=RngConfig() if state.rng else None, console=console,
                    vhost_users=tuple(generic))

