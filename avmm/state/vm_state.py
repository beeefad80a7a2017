"""The VM-level sections of a snapshot: the config the VM was built from and the state of
its legacy devices, as plain versioned data (see :mod:`avmm.state.codec`).

The config is saved field by field, not as the live :class:`~avmm.config.VmConfig`
(paths become strings, tuples lists), and :func:`config_from_state` checks every field
again on the way back, through the same parsers as a vm.toml or an API request
(avmm/config.py) and under the daemon's path policy: a state file is input like any
other, and its SHA-256 only proves it is whole, not that avmm wrote it. The VM recipe
then opens each file through its :class:`~avmm.paths.PathPolicy` as for any config.
``boot`` is kept for the record only: a restored VM loads no kernel.

Limits (version 2 of the config records). The CPU controls (``cpu_weight``,
``cpu_max_percent``, ``cpu_affinity``, ``vcpu_affinity``) and the I/O rate limits (each
disk's and NIC direction's own buckets or group, the VM's ``[rate_limit_groups]``) are
saved as they are IN EFFECT when the state is taken (changes made at run time included:
see :meth:`avmm.vm.VirtualMachine._config_in_effect`), not as the VM was first
configured. A device in one of the daemon's groups (``PUT /rate_limit_groups/NAME``) is
saved as naming a group of the VM's own with that name and the daemon group's buckets,
so that a restore on another host keeps the limit (limited on its own, no longer shared
with the other VMs of the group). The buckets' levels are not saved: a restored VM's
buckets start full. The codec has no floats: ``cpu_max_percent`` is saved as an integer
of thousandths of a percent (:data:`MILLIPERCENT`), finer than the cgroup quota it
becomes (a microsecond of CPU time per period of 10 to 100 ms; see
:func:`avmm.cgroups.backend.quota_us`). State written before (version 1) restores with
no limits, as it was taken.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, ClassVar, Final

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
from ..ratelimit import BucketConfig, RateLimitConfig
from ..vm_virtio import VirtioSlotState
from ._errors import SnapshotError
from .codec import U32, U64
from .machine import MachineState

#: ``cpu_max_percent`` is saved in thousandths of a percent (150.5 → 150500).
MILLIPERCENT: Final = 1000


@dataclass(frozen=True)
class BucketState:
    """A :class:`~avmm.ratelimit.BucketConfig` (its configuration, not its level)."""

    size: U64
    refill_ms: U32
    one_time_burst: U64


@dataclass(frozen=True)
class RateLimitState:
    """A :class:`~avmm.ratelimit.RateLimitConfig`."""

    bandwidth: BucketState | None
    ops: BucketState | None


@dataclass(frozen=True)
class RateLimitGroupState:
    """One ``[rate_limit_groups.NAME]`` of the VM."""

    name: str
    limit: RateLimitState


def _upgrade_from_1(cls: type, version: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Version 1 of a config record had no limits: the fields version 2 added (those with
    a default: "no limit") are filled in with it. A version-1 field has no default, so
    one missing stays missing and the codec refuses the record."""
    if version != 1:  # the codec passes versions 1 .. current-1 only
        raise SnapshotError(f"{cls.__name__}: no upgrade from version {version}")
    added = {field.name: field.default if field.default is not dataclasses.MISSING
             else field.default_factory()  # type: ignore[misc]
             for field in dataclasses.fields(cls)
             if field.name not in fields and (field.default is not dataclasses.MISSING
                                              or field.default_factory
                                              is not dataclasses.MISSING)}
    return {**added, **fields}


@dataclass(frozen=True)
class MachineConfigState:
    """``[machine]``; version 2 added the CPU controls (None: not asked)."""

    STATE_VERSION: ClassVar[int] = 2

    vcpus: U32
    memory_mib: U32
    cpu_profile: str
    hide_cpu_features: list[str]
    acpi: bool
    cpu_weight: U32 | None = None
    #: In thousandths of a percent (:data:`MILLIPERCENT`).
    cpu_max_millipercent: U64 | None = None
    cpu_affinity: list[U32] | None = None
    vcpu_affinity: list[list[U32]] | None = None

    @classmethod
    def upgrade_state(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        return _upgrade_from_1(cls, version, fields)


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
    """A ``[[disk]]``; version 2 added its rate limit (own buckets or a group)."""

    STATE_VERSION: ClassVar[int] = 2

    path: str | None
    readonly: bool
    id: str | None
    vhost_user: str | None
    rate_limit: RateLimitState | None = None
    rate_limit_group: str | None = None

    @classmethod
    def upgrade_state(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        return _upgrade_from_1(cls, version, fields)


@dataclass(frozen=True)
class NetConfigState:
    """A ``[[net]]``; version 2 added the TX and RX rate limits."""

    STATE_VERSION: ClassVar[int] = 2

    tap: str | None
    mac: bytes | None
    netns: str | None
    vhost_user: str | None
    tx_rate_limit: RateLimitState | None = None
    rx_rate_limit: RateLimitState | None = None
    tx_rate_limit_group: str | None = None
    rx_rate_limit_group: str | None = None

    @classmethod
    def upgrade_state(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        return _upgrade_from_1(cls, version, fields)


@dataclass(frozen=True)
class VhostUserConfigState:
    socket: str
    device_id: U32
    num_queues: U32
    queue_size: U32


@dataclass(frozen=True)
class ConfigState:
    """The :class:`~avmm.config.VmConfig` of a snapshotted VM, its limits as in effect
    when the state was taken; version 2 added ``rate_limit_groups``."""

    STATE_VERSION: ClassVar[int] = 2

    name: str | None
    machine: MachineConfigState
    boot: BootConfigState
    serial: OutputConfigState
    disks: list[DiskConfigState]
    nets: list[NetConfigState]
    rng: bool
    console: OutputConfigState | None
    vhost_users: list[VhostUserConfigState]
    rate_limit_groups: list[RateLimitGroupState] = dataclass_field(default_factory=list)

    @classmethod
    def upgrade_state(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        return _upgrade_from_1(cls, version, fields)


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


def _bucket_state(bucket: BucketConfig | None) -> BucketState | None:
    if bucket is None:
        return None
    return BucketState(size=bucket.size, refill_ms=bucket.refill_ms,
                       one_time_burst=bucket.one_time_burst)


def _limit_state(limit: RateLimitConfig | None) -> RateLimitState | None:
    if limit is None or limit.unlimited:
        return None
    return RateLimitState(bandwidth=_bucket_state(limit.bandwidth),
                          ops=_bucket_state(limit.ops))


def millipercent(max_percent: float) -> int:
    """``cpu_max_percent`` → the integer saved (at least 1: any quota the config
    accepts is above 0, and one thousandth of a percent is already below the kernel's
    smallest quota)."""
    return max(1, round(max_percent * MILLIPERCENT))


def percent(millipercent: int) -> int | float:
    """The saved integer → ``cpu_max_percent`` (an int when it is a whole percent)."""
    whole, rest = divmod(millipercent, MILLIPERCENT)
    return whole if not rest else millipercent / MILLIPERCENT


def _machine_state(machine: Any) -> MachineConfigState:
    return MachineConfigState(
        vcpus=machine.vcpus, memory_mib=machine.memory_mib, cpu_profile=machine.cpu_profile,
        hide_cpu_features=list(machine.hide_cpu_features), acpi=machine.acpi,
        cpu_weight=machine.cpu_weight,
        cpu_max_millipercent=(None if machine.cpu_max_percent is None
                              else millipercent(machine.cpu_max_percent)),
        cpu_affinity=None if machine.cpu_affinity is None else list(machine.cpu_affinity),
        vcpu_affinity=(None if machine.vcpu_affinity is None
                       else [list(cpus) for cpus in machine.vcpu_affinity]))


def config_to_state(config: VmConfig) -> ConfigState:
    """The plain-data form of ``config`` (for a running VM, pass the config with its
    limits in effect: :meth:`avmm.vm.VirtualMachine._config_in_effect`)."""
    return ConfigState(
        name=config.name,
        machine=_machine_state(config.machine),
        boot=BootConfigState(kernel=os.fspath(config.boot.kernel),
                             initrd=_str(config.boot.initrd), cmdline=config.boot.cmdline),
        serial=OutputConfigState(mode=config.serial.mode, path=_str(config.serial.path)),
        disks=[DiskConfigState(path=_str(d.path), readonly=d.readonly, id=d.id,
                               vhost_user=_str(d.vhost_user),
                               rate_limit=_limit_state(d.rate_limit),
                               rate_limit_group=d.rate_limit_group)
               for d in config.disks],
        nets=[NetConfigState(tap=n.tap, mac=n.mac, netns=n.netns,
                             vhost_user=_str(n.vhost_user),
                             tx_rate_limit=_limit_state(n.tx_rate_limit),
                             rx_rate_limit=_limit_state(n.rx_rate_limit),
                             tx_rate_limit_group=n.tx_rate_limit_group,
                             rx_rate_limit_group=n.rx_rate_limit_group)
              for n in config.nets],
        rng=config.rng is not None,
        console=None if config.console is None else OutputConfigState(
            mode=config.console.mode, path=_str(config.console.path)),
        vhost_users=[VhostUserConfigState(socket=os.fspath(v.socket), device_id=v.device_id,
                                          num_queues=v.num_queues, queue_size=v.queue_size)
                     for v in config.vhost_users],
        rate_limit_groups=[RateLimitGroupState(name=name, limit=state)
                           for name, limit in config.rate_limit_groups
                           if (state := _limit_state(limit)) is not None],
    )


def _bucket_data(bucket: BucketState | None) -> dict[str, Any] | None:
    if bucket is None:
        return None
    return {"size": bucket.size, "refill_ms": bucket.refill_ms,
            "one_time_burst": bucket.one_time_burst}


def _limit_data(limit: RateLimitState | None) -> dict[str, Any] | None:
    """A saved limit as its vm.toml table (None: the key is left out). An empty one
    (no bucket) is kept as the empty table, which the parser reads as unlimited."""
    if limit is None:
        return None
    return {key: value for key, value in (("bandwidth", _bucket_data(limit.bandwidth)),
                                          ("ops", _bucket_data(limit.ops)))
            if value is not None}


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
                 "hide_cpu_features": list(m.hide_cpu_features), "acpi": m.acpi,
                 **some(cpu_weight=m.cpu_weight,
                        cpu_max_percent=(None if m.cpu_max_millipercent is None
                                         else percent(m.cpu_max_millipercent)),
                        cpu_affinity=m.cpu_affinity, vcpu_affinity=m.vcpu_affinity)},
        boot=some(kernel=state.boot.kernel, initrd=state.boot.initrd,
                  cmdline=state.boot.cmdline),
        serial=some(mode=state.serial.mode, path=state.serial.path),
        disk=[some(path=d.path, readonly=True if d.readonly else None, id=d.id,
                   vhost_user=socket(f"blk{index}", d.vhost_user),
                   rate_limit=_limit_data(d.rate_limit),
                   rate_limit_group=d.rate_limit_group)
              for index, d in enumerate(state.disks)],
        net=[some(tap=n.tap, mac=None if n.mac is None else n.mac.hex(":"), netns=n.netns,
                  vhost_user=socket(f"net{index}", n.vhost_user),
                  tx_rate_limit=_limit_data(n.tx_rate_limit),
                  rx_rate_limit=_limit_data(n.rx_rate_limit),
                  tx_rate_limit_group=n.tx_rate_limit_group,
                  rx_rate_limit_group=n.rx_rate_limit_group)
             for index, n in enumerate(state.nets)],
        rng={} if state.rng else None,
        console=None if state.console is None else some(mode=state.console.mode,
                                                        path=state.console.path),
        vhost_user=[{"socket": socket(f"vhost{index}", v.socket), "device_id": v.device_id,
                     "num_queues": v.num_queues, "queue_size": v.queue_size}
                    for index, v in enumerate(state.vhost_users)],
    )
    if state.rate_limit_groups:
        # A dict keeps one entry per name: a second group of the same name would be lost
        # silently, so it is refused as a TOML parser refuses a repeated table.
        groups: dict[str, Any] = {}
        for group in state.rate_limit_groups:
            if group.name in groups:
                raise ConfigError(f"rate-limit group {group.name!r} is saved twice",
                                  key=f"rate_limit_groups.{group.name}")
            groups[group.name] = _limit_data(group.limit)
        data["rate_limit_groups"] = groups
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

    try:
        data = _config_data(state, socket)
    except ConfigError as e:
        raise SnapshotError(f"{source}: saved config {e.key}: {e.reason}") from None
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


#: The sections of a VM snapshot's state file (besides the memory file's), and their types.
SNAPSHOT_SECTIONS: dict[str, Any] = {
    "config": ConfigState,
    "machine": MachineState,
    "devices": LegacyDevicesState,
    "virtio": VirtioDevicesState,
}
