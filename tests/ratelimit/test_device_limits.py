"""DeviceLimits: config → throttles on the devices, groups shared within a VM, run-time
changes (in place, leaving a group, removing), and what GET and /metrics show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from avmm.config import BootConfig, DiskConfig, MachineConfig, NetConfig, SerialConfig, VmConfig
from avmm.ratelimit import BucketConfig, DeviceLimits, LimitTargetError, RateLimitConfig


class FakeDisk:
    throttle: Any = None


class FakeNic:
    tx_throttle: Any = None
    rx_throttle: Any = None


class VhostUser:
    """A device served elsewhere: no throttle attribute."""


OPS = RateLimitConfig(ops=BucketConfig(size=10, refill_ms=1000))
BYTES = RateLimitConfig(bandwidth=BucketConfig(size=4096, refill_ms=100))


def vm_config(disks: tuple[DiskConfig, ...], nets: tuple[NetConfig, ...] = (),
              groups: tuple[tuple[str, RateLimitConfig], ...] = ()) -> VmConfig:
    return VmConfig(machine=MachineConfig(), boot=BootConfig(kernel=Path("/k")),
                    serial=SerialConfig(), disks=disks, nets=nets, rate_limit_groups=groups)


def test_config_limits_land_on_the_devices_and_groups_are_shared() -> None:
    config = vm_config(
        disks=(DiskConfig(Path("/a"), rate_limit=OPS), DiskConfig(Path("/b")),
               DiskConfig(Path("/c"), rate_limit_group="g"), DiskConfig(vhost_user=Path("/s"))),
        nets=(NetConfig(tap="t0", tx_rate_limit=BYTES, rx_rate_limit_group="g"),),
        groups=(("g", OPS), ("unused", BYTES)))
    disks = [FakeDisk(), FakeDisk(), FakeDisk(), VhostUser()]
    nic = FakeNic()
    limits = DeviceLimits.attach(config, disks, [nic])
    assert disks[0].throttle.limiter.config == OPS
    assert disks[1].throttle is None
    assert disks[2].throttle.limiter is nic.rx_throttle.limiter is limits.groups["g"]
    assert disks[0].throttle.limiter is not limits.groups["g"]
    assert nic.tx_throttle.limiter.config == BYTES
    assert set(limits.groups) == {"g"}  # a group nobody names gets no limiter
    shown = limits.to_dict()
    assert [d["device"] for d in shown["disks"]] == ["blk0", "blk1", "blk2"]
    assert shown["disks"][0]["rate_limit"] == {"ops": {"size": 10, "refill_ms": 1000}}
    assert shown["disks"][0]["tokens"] == {"ops": 10}
    assert shown["disks"][1] == {"rate_limit": None, "rate_limit_group": None,
                                 "index": 1, "device": "blk1"}
    assert shown["disks"][2]["rate_limit_group"] == "g"
    assert shown["nets"][0]["rx"]["rate_limit_group"] == "g"
    assert shown["nets"][0]["tx"]["rate_limit"] == BYTES.to_dict()
    assert shown["groups"] == {"g": OPS.to_dict()}


def test_changes_in_place_leave_the_group_and_remove() -> None:
    config = vm_config(disks=(DiskConfig(Path("/a"), rate_limit=OPS),
                              DiskConfig(Path("/b"), rate_limit_group="g"),
                              DiskConfig(Path("/c"), rate_limit_group="g")),
                       groups=(("g", OPS),))
    disks = [FakeDisk(), FakeDisk(), FakeDisk()]
    limits = DeviceLimits.attach(config, disks, [])
    own = disks[0].throttle
    own_limiter = own.limiter
    assert own.admit(0) == 0
    limits.set("disk", 0, None, BYTES)
    # Its own limiter changed in place; the throttle (and its counters) stayed.
    assert disks[0].throttle is own and own.limiter is own_limiter
    assert own_limiter.config == BYTES and own.admitted_ops == 1
    group = limits.groups["g"]
    limits.set("disk", 1, None, BYTES)
    assert disks[1].throttle.limiter is not group
    assert disks[2].throttle.limiter is group and group.config == OPS
    limits.set_group("g", BYTES)
    assert group.config == BYTES
    limits.set("disk", 0, None, None)
    assert disks[0].throttle is None
    shown = limits.to_dict()["disks"][0]
    assert shown["rate_limit"] is None and shown["admitted_ops"] == 1  # counters kept
    limits.set("disk", 0, None, OPS)
    assert disks[0].throttle is own and own.limiter.config == OPS


def test_the_waits_are_reported_per_device_and_kind() -> None:
    config = vm_config(disks=(DiskConfig(Path("/a"), rate_limit=OPS),),
                       nets=(NetConfig(tap="t0", rx_rate_limit=BYTES),))
    nic = FakeNic()
    limits = DeviceLimits.attach(config, [FakeDisk()], [nic])
    assert sorted((device, kind) for device, kind, _ in limits.wait_seconds()) == [
        ("blk0", "bandwidth"), ("blk0", "ops"), ("net0", "rx_bandwidth"), ("net0", "rx_ops")]


@pytest.mark.parametrize(("kind", "index", "direction", "status", "words"), [
    ("disk", 5, None, 404, "no disk 5 (disks: 2)"),
    ("net", 0, "tx", 404, "no net 0 (NICs: 0)"),
    ("disk", 1, None, 400, "vhost-user back-end"),
    ("disk", True, None, 400, "expected a device index"),
])
def test_bad_targets_are_refused(kind: str, index: Any, direction: str | None, status: int,
                                 words: str) -> None:
    limits = DeviceLimits.attach(
        vm_config(disks=(DiskConfig(Path("/a")), DiskConfig(vhost_user=Path("/s")))),
        [FakeDisk(), VhostUser()], [])
    with pytest.raises(LimitTargetError) as caught:
        limits.set(kind, index, direction, OPS, key="k")
    assert caught.value.status == status and words in str(caught.value)
    with pytest.raises(LimitTargetError):
        limits.set_group("nope", OPS)


def test_a_group_the_config_lacks_is_the_daemon_s_shared_by_every_vm() -> None:
    from avmm.ratelimit import SharedGroups, UnknownGroupError

    shared = SharedGroups()
    daemon_group, created = shared.put("tenant", OPS)
    assert created
    first = vm_config(disks=(DiskConfig(Path("/a"), rate_limit_group="tenant"),))
    # A VM whose config defines a group of that name keeps its own.
    second = vm_config(disks=(DiskConfig(Path("/b"), rate_limit_group="tenant"),
                              DiskConfig(Path("/c"), rate_limit_group="own")),
                       groups=(("own", BYTES),))
    disks_a, disks_b = [FakeDisk()], [FakeDisk(), FakeDisk()]
    limits_a = DeviceLimits.attach(first, disks_a, [], shared=shared)
    limits_b = DeviceLimits.attach(second, disks_b, [], shared=shared)
    assert disks_a[0].throttle.limiter is daemon_group is disks_b[0].throttle.limiter
    assert disks_b[1].throttle.limiter is limits_b.groups["own"]
    assert limits_a.to_dict()["shared_groups"] == ["tenant"]
    assert limits_a.to_dict()["groups"] == {}
    # A VM's PATCH cannot change the daemon's group; the daemon's PUT changes it for all.
    with pytest.raises(LimitTargetError, match="PUT /rate_limit_groups"):
        limits_a.set_group("tenant", BYTES)
    again, created = shared.put("tenant", BYTES)
    assert again is daemon_group and not created and daemon_group.config == BYTES
    shared.remove("tenant")
    assert disks_a[0].throttle.limiter is daemon_group  # VMs keep what they use
    with pytest.raises(UnknownGroupError, match="PUT /rate_limit_groups/tenant"):
        DeviceLimits.attach(first, [FakeDisk()], [], shared=shared)


def test_in_effect_is_the_config_with_the_limits_as_changed_at_run_time() -> None:
    from avmm.ratelimit import SharedGroups

    shared = SharedGroups()
    shared.put("daemon", OPS)
    config = vm_config(
        disks=(DiskConfig(Path("/a"), rate_limit=OPS), DiskConfig(Path("/b")),
               DiskConfig(Path("/c"), rate_limit_group="g"),
               DiskConfig(Path("/d"), rate_limit_group="daemon"),
               DiskConfig(vhost_user=Path("/s"))),
        nets=(NetConfig(tap="t0", tx_rate_limit=BYTES, rx_rate_limit_group="g"),),
        groups=(("g", OPS), ("unused", BYTES)))
    limits = DeviceLimits.attach(config, [FakeDisk(), FakeDisk(), FakeDisk(), FakeDisk(),
                                          VhostUser()], [FakeNic()], shared=shared)
    assert limits.in_effect(config) == vm_config(
        disks=config.disks, nets=config.nets,
        groups=(("g", OPS), ("unused", BYTES), ("daemon", OPS)))
    limits.set("disk", 0, None, None)
    limits.set("disk", 1, None, BYTES)
    limits.set("disk", 2, None, BYTES)  # leaves group g
    limits.set("net", 0, "tx", None)
    limits.set_group("g", BYTES)
    shared.put("daemon", BYTES)
    now = limits.in_effect(config)
    assert now.disks == (DiskConfig(Path("/a")), DiskConfig(Path("/b"), rate_limit=BYTES),
                         DiskConfig(Path("/c"), rate_limit=BYTES),
                         DiskConfig(Path("/d"), rate_limit_group="daemon"),
                         DiskConfig(vhost_user=Path("/s")))
    assert now.nets == (NetConfig(tap="t0", rx_rate_limit_group="g"),)
    assert now.rate_limit_groups == (("g", BYTES), ("unused", BYTES), ("daemon", BYTES))
    # As the daemon shows it: its group named, not copied into the VM's.
    assert limits.in_effect(config, shared_as_own=False).rate_limit_groups == (
        ("g", BYTES), ("unused", BYTES))
    # Nothing attached yet: the config as it is.
    assert DeviceLimits().in_effect(config) is config
