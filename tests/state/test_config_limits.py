"""The limits in a saved config (version 2 of its records): the CPU controls and the I/O
rate limits go through the state and come back as the config parser reads them; a bad
saved value is refused naming its key; a version-1 state (written before limits were
saved) still restores, with no limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest

from avmm.cgroups.backend import quota_us
from avmm.config import config_from_dict
from avmm.errors import StateError
from avmm.state import SnapshotError
from avmm.state._writer import build_plain
from avmm.state.codec import U32, Record, decode, encode, state_name
from avmm.state.vm_state import (
    BucketState,
    ConfigState,
    MachineConfigState,
    RateLimitGroupState,
    RateLimitState,
    config_from_state,
    config_to_state,
    millipercent,
    percent,
)
from tests.vm.helpers import TEST_GUEST

OPS = {"size": 50, "refill_ms": 1000}
BYTES = {"size": 1 << 20, "refill_ms": 100, "one_time_burst": 4096}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


def limited(image: Path, **machine: Any) -> dict[str, Any]:
    """A vm.toml (as a dict) using every limit key."""
    return {
        "machine": {"memory_mib": 32, "acpi": False, "cpu_weight": 250,
                    "cpu_max_percent": 50.5, "cpu_affinity": "0", "vcpu_affinity": ["0"],
                    **machine},
        "boot": {"kernel": str(TEST_GUEST)},
        "disk": [{"path": str(image), "rate_limit": {"ops": OPS, "bandwidth": BYTES}},
                 {"path": str(image), "readonly": True, "rate_limit_group": "shared"}],
        "net": [{"tap": "tap-lim0", "tx_rate_limit": {"bandwidth": BYTES},
                 "rx_rate_limit_group": "shared"},
                {"tap": "tap-lim1", "tx_rate_limit_group": "shared"}],
        "rate_limit_groups": {"shared": {"ops": OPS}, "spare": {"bandwidth": BYTES}},
    }


def through_state(state: ConfigState) -> Any:
    return config_from_state(decode(encode(state), ConfigState), source="state.avmm")


def test_every_limit_survives_the_state_round_trip(image: Path) -> None:
    config = config_from_dict(limited(image), base_dir=None, source="vm.toml")
    restored = through_state(config_to_state(config))
    assert restored.machine == config.machine
    assert restored.disks == config.disks
    assert restored.nets == config.nets
    assert restored.rate_limit_groups == config.rate_limit_groups


def test_a_config_without_limits_comes_back_without_limits(image: Path) -> None:
    data = limited(image)
    data["machine"] = {"memory_mib": 32, "acpi": False}
    data["disk"] = [{"path": str(image)}]
    data["net"] = [{"tap": "tap-lim0"}]
    del data["rate_limit_groups"]
    config = config_from_dict(data, base_dir=None)
    restored = through_state(config_to_state(config))
    assert restored.machine == config.machine
    assert restored.machine.cpu_weight is None and restored.machine.cpu_max_percent is None
    assert restored.disks == config.disks and restored.nets == config.nets
    assert restored.rate_limit_groups == ()


# Values a one-CPU host accepts too (at most 100 per host CPU).
@pytest.mark.parametrize("value", [75, 75.0, 0.5, 33.333, 12.3456, 0.0001, 99.9999, 1])
def test_cpu_max_percent_comes_back_as_the_same_quota(image: Path, value: float) -> None:
    config = config_from_dict(limited(image, cpu_max_percent=value), base_dir=None)
    restored = through_state(config_to_state(config)).machine.cpu_max_percent
    # The quota written to the cgroup is the same to the microsecond, and what comes
    # back is a value the parser accepts that saves the same again (a fixed point).
    assert quota_us(restored) == quota_us(value)
    assert millipercent(restored) == millipercent(value)
    if value == int(value):
        assert restored == value and isinstance(restored, int)


def test_thousandths_of_a_percent_are_a_fixed_point() -> None:
    for saved in [*range(1, 3000), 33_333, 123_457, 9_999_999, 10**9 + 7]:
        assert millipercent(percent(saved)) == saved


def _group(name: str, limit: RateLimitState) -> RateLimitGroupState:
    return RateLimitGroupState(name=name, limit=limit)


@pytest.mark.parametrize(("change", "key"), [
    (lambda s: {"machine": dataclasses.replace(s.machine, cpu_weight=0)},
     r"machine\.cpu_weight"),
    (lambda s: {"machine": dataclasses.replace(s.machine, cpu_weight=10001)},
     r"machine\.cpu_weight"),
    (lambda s: {"machine": dataclasses.replace(s.machine, cpu_max_millipercent=0)},
     r"machine\.cpu_max_percent"),
    (lambda s: {"machine": dataclasses.replace(s.machine, cpu_max_millipercent=10**12)},
     r"machine\.cpu_max_percent"),
    (lambda s: {"machine": dataclasses.replace(s.machine, cpu_affinity=[])},
     r"machine\.cpu_affinity"),
    (lambda s: {"machine": dataclasses.replace(s.machine, vcpu_affinity=[[0], [0]])},
     r"machine\.vcpu_affinity"),
    (lambda s: {"disks": [dataclasses.replace(s.disks[0], rate_limit=RateLimitState(
        bandwidth=None, ops=BucketState(size=0, refill_ms=1, one_time_burst=0)))]},
     r"disk\[0\]\.rate_limit\.ops\.size"),
    (lambda s: {"disks": [dataclasses.replace(s.disks[0], rate_limit=RateLimitState(
        bandwidth=BucketState(size=1, refill_ms=10**9, one_time_burst=0), ops=None))]},
     r"disk\[0\]\.rate_limit\.bandwidth\.refill_ms"),
    (lambda s: {"disks": [dataclasses.replace(s.disks[0], rate_limit_group="nowhere")]},
     r"disk\[0\]\.rate_limit_group"),
    (lambda s: {"nets": [dataclasses.replace(s.nets[0], tx_rate_limit_group="a b")]},
     r"net\[0\]\.tx_rate_limit_group"),
    (lambda s: {"rate_limit_groups": [_group("x/y", s.rate_limit_groups[0].limit)]},
     r"rate_limit_groups\.\"x/y\""),
    (lambda s: {"rate_limit_groups": [_group("e", RateLimitState(bandwidth=None,
                                                                 ops=None))]},
     r"rate_limit_groups\.e"),
    (lambda s: {"rate_limit_groups": [*s.rate_limit_groups, s.rate_limit_groups[0]]},
     r"rate_limit_groups\.shared"),
])
def test_a_bad_saved_limit_is_refused_naming_its_key(image: Path, change: Any,
                                                     key: str) -> None:
    state = config_to_state(config_from_dict(limited(image), base_dir=None))
    bad = dataclasses.replace(state, **change(state))
    with pytest.raises(StateError, match=rf"^state\.avmm: saved config {key}: ") as info:
        through_state(bad)
    assert "\n" not in str(info.value)


# -- version 1: the records as avmm wrote them before limits were saved -----------------

@dataclasses.dataclass(frozen=True)
class _MachineV1:
    STATE_NAME: ClassVar[str] = "MachineConfigState"
    vcpus: U32
    memory_mib: U32
    cpu_profile: str
    hide_cpu_features: list[str]
    acpi: bool


@dataclasses.dataclass(frozen=True)
class _BootV1:
    STATE_NAME: ClassVar[str] = "BootConfigState"
    kernel: str
    initrd: str | None
    cmdline: str


@dataclasses.dataclass(frozen=True)
class _OutputV1:
    STATE_NAME: ClassVar[str] = "OutputConfigState"
    mode: str
    path: str | None


@dataclasses.dataclass(frozen=True)
class _DiskV1:
    STATE_NAME: ClassVar[str] = "DiskConfigState"
    path: str | None
    readonly: bool
    id: str | None
    vhost_user: str | None


@dataclasses.dataclass(frozen=True)
class _NetV1:
    STATE_NAME: ClassVar[str] = "NetConfigState"
    tap: str | None
    mac: bytes | None
    netns: str | None
    vhost_user: str | None


@dataclasses.dataclass(frozen=True)
class _ConfigV1:
    STATE_NAME: ClassVar[str] = "ConfigState"
    name: str | None
    machine: _MachineV1
    boot: _BootV1
    serial: _OutputV1
    disks: list[_DiskV1]
    nets: list[_NetV1]
    rng: bool
    console: _OutputV1 | None
    vhost_users: list[Any]


def test_a_version_1_config_restores_with_no_limits(image: Path) -> None:
    old = _ConfigV1(
        name="old", machine=_MachineV1(vcpus=1, memory_mib=32, cpu_profile="auto",
                                       hide_cpu_features=[], acpi=False),
        boot=_BootV1(kernel=str(TEST_GUEST), initrd=None, cmdline="avmm.test=hello"),
        serial=_OutputV1(mode="console", path=None),
        disks=[_DiskV1(path=str(image), readonly=False, id="d0", vhost_user=None)],
        nets=[_NetV1(tap="tap-old", mac=bytes.fromhex("020000000001"), netns=None,
                     vhost_user=None)],
        rng=True, console=None, vhost_users=[])
    state = decode(encode(old), ConfigState)
    assert isinstance(state.machine, MachineConfigState)
    config = config_from_state(state, source="old.avmm")
    assert config.name == "old" and config.disks[0].id == "d0"
    assert config.nets[0].mac == bytes.fromhex("020000000001")
    machine = config.machine
    assert (machine.cpu_weight, machine.cpu_max_percent, machine.cpu_affinity,
            machine.vcpu_affinity) == (None, None, None, None)
    assert config.disks[0].rate_limit is None and config.disks[0].rate_limit_group is None
    net = config.nets[0]
    assert (net.tx_rate_limit, net.rx_rate_limit, net.tx_rate_limit_group,
            net.rx_rate_limit_group) == (None, None, None, None)
    assert config.rate_limit_groups == ()


@pytest.mark.parametrize("cls", [ConfigState, MachineConfigState])
def test_a_record_of_version_0_is_refused_in_one_line(cls: type) -> None:
    """Versions start at 1: a hostile file or stream with a version-0 record is a
    SnapshotError (one line), not an upgrade attempt that escapes as another error."""
    payload = build_plain(Record(state_name(cls), 0, {}))
    with pytest.raises(SnapshotError, match="version 0"):
        decode(payload, cls, path="config")
