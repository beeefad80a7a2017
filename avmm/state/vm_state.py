"""The VM-level sections of a snapshot: the config the VM was built from and the state of
its legacy devices, as plain versioned data (see :mod:`avmm.state.codec`).

The config is saved field by field, not as the live :class:`~avmm.config.VmConfig`
(paths become strings, tuples lists), and :func:`config_from_state` checks every field
again on the way back, through the same parsers as a vm.toml or an API request
(avmm/config.py) and under the daemon's path policy: a state file is input like any
other, and its SHA-256 only proves it is whole, not that avmm wrote it. The VM recipe
then opens each file through its :class:`~avmm.paths.PathPolicy` as for any config.
``boot`` is kept for the record only: a restored VM loads no kernel.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import (
    _CMDLINE,
    _ROOT,
    BootConfig,
    PathCheck,
    VmConfig,
    _Context,
    _Field,
    _path,
    _Table,
)
from ..devices.acpi_sleep import AcpiSleepState
from ..devices.boot_timer import BootTimerState
from ..devices.debug_exit import DebugExitState
from ..devices.i8042 import I8042State
from ..devices.serial import Serial8250State
from ..errors import ConfigError, PathNotAllowedError
from ..vm_virtio import VirtioSlotState
from ._errors import SnapshotError
from .codec import U32


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


def _saved_boot() -> Any:
    """avmm/config.py's schema with ``[boot]`` relaxed to what a restore needs: a
    restored VM loads no kernel, so its kernel and initrd must be absolute paths but need
    not exist any more (nor be inside the daemon's allowed directories: they are never
    opened). Everything else goes through the very parsers a vm.toml or an API request
    goes through."""
    boot = _Table(
        fields=(_Field("kernel", _path), _Field("initrd", _path, default=None),
                _Field("cmdline", _CMDLINE, default="")),
        build=lambda values, raw, key, context: BootConfig(**values))
    return _Table(fields=tuple(dataclasses.replace(field, parse=boot)
                               if field.name == "boot" else field
                               for field in _ROOT.fields),
                  build=_ROOT.build)


_SAVED_ROOT: Any = _saved_boot()


def _config_data(state: ConfigState, socket: Any) -> dict[str, Any]:
    """``state`` as the dict a vm.toml parses into (keys left out where it has their
    default), for :data:`_SAVED_ROOT`; ``socket(name, saved)`` picks a vhost-user
    device's socket (the saved one, or its replacement)."""
    def some(**items: Any) -> dict[str, Any]:
        return {key: value for key, value in items.items() if value is not None}

    m = state.machine
    data: dict[str, Any] = some(
        name=state.name,
        machine={"vcpus": m.vcpus, "memory_mib": m.memory_mib, "cpu_profile": m.cpu_profile,
                 "hide_cpu_features": list(m.hide_cpu_features), "acpi": m.acpi},
        boot=some(kernel=state.boot.kernel, initrd=state.boot.initrd,
                  cmdline=state.boot.cmdline),
        serial=some(mode=state.serial.mode, path=state.serial.path),
        disk=[some(path=d.path, readonly=True if d.readonly else None, id=d.id,
                   vhost_user=socket(f"blk{index}", d.vhost_user))
              for index, d in enumerate(state.disks)],
        net=[some(tap=n.tap, mac=None if n.mac is None else n.mac.hex(":"), netns=n.netns,
                  vhost_user=socket(f"net{index}", n.vhost_user))
             for index, n in enumerate(state.nets)],
        rng={} if state.rng else None,
        console=None if state.console is None else some(mode=state.console.mode,
                                                        path=state.console.path),
        vhost_user=[{"socket": socket(f"vhost{index}", v.socket), "device_id": v.device_id,
                     "num_queues": v.num_queues, "queue_size": v.queue_size}
                    for index, v in enumerate(state.vhost_users)],
    )
    return data


def config_from_state(state: ConfigState, *, source: str,
                      vhost_user: Mapping[str, str] | None = None,
                      path_check: PathCheck | None = None) -> VmConfig:
    """The :class:`VmConfig` ``state`` describes, every field checked by the parsers of
    avmm/config.py as in a config file (names, tap names, MACs, network namespaces,
    disk ids, counts, paths absolute; the disks, sockets and output files it names
    must be there as when a VM is created; only the kernel and initrd need not: see
    :func:`_saved_boot`). ``path_check`` is the daemon's path policy
    (:meth:`avmm.paths.PathPolicy.check`), applied to every path as for a config posted
    to the API. ``vhost_user`` replaces the socket of vhost-user devices by device name
    (``blk0``, ``net1``, ``vhost0``: the names avmm gives them, in config order).

    :raises PathNotAllowedError: a path lies outside the daemon's allowed directories.
    :raises SnapshotError: a field avmm could not have saved (one line naming the key),
        or a ``vhost_user`` name that is no vhost-user device of this VM.
    """
    replacements = dict(vhost_user or {})
    used: set[str] = set()

    def socket(name: str, saved: str | None) -> str | None:
        if saved is not None and name in replacements:
            used.add(name)
            return replacements[name]
        return saved

    data = _config_data(state, socket)
    unused = sorted(set(replacements) - used)
    if unused:
        raise SnapshotError(f"{source}: vhost_user names {unused[0]!r}, which is no "
                            "vhost-user device of the saved VM")
    context = _Context(base_dir=None, source=source, path_check=path_check)
    try:
        config: VmConfig = _SAVED_ROOT(data, "", context)
    except PathNotAllowedError:
        raise
    except ConfigError as e:
        key = f" {e.key}" if e.key else ""
        raise SnapshotError(f"{source}: saved config{key}: {e.reason}") from None
    return config
