"""Rate limits in vm.toml: disk/NIC keys, [rate_limit_groups.NAME], and errors naming the key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from avmm.config import load_config, parse_rate_limit
from avmm.errors import ConfigError
from avmm.host import config_to_dict
from avmm.ratelimit import BucketConfig, RateLimitConfig

HEAD = '[boot]\nkernel = "vmlinux"\n'


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    return tmp_path


def load(directory: Path, text: str):  # type: ignore[no-untyped-def]
    path = directory / "vm.toml"
    path.write_text(HEAD + text)
    return load_config(path)


def test_disk_and_nic_limits_and_groups_are_parsed(vm_dir: Path) -> None:
    config = load(vm_dir, """
[[disk]]
path = "disk.img"
[disk.rate_limit]
bandwidth = { size = 8388608, refill_ms = 1000, one_time_burst = 1048576 }
ops = { size = 500, refill_ms = 1000 }

[[disk]]
path = "disk.img"
rate_limit_group = "shared"

[[net]]
tap = "avmmrl0"
tx_rate_limit = { ops = { size = 1000, refill_ms = 100 } }
rx_rate_limit_group = "shared"

[rate_limit_groups.shared]
ops = { size = 200, refill_ms = 1000 }
""")
    first, second = config.disks
    assert first.rate_limit == RateLimitConfig(
        bandwidth=BucketConfig(size=8 << 20, refill_ms=1000, one_time_burst=1 << 20),
        ops=BucketConfig(size=500, refill_ms=1000))
    assert (second.rate_limit, second.rate_limit_group) == (None, "shared")
    net = config.nets[0]
    assert net.tx_rate_limit == RateLimitConfig(ops=BucketConfig(size=1000, refill_ms=100))
    assert (net.rx_rate_limit, net.rx_rate_limit_group) == (None, "shared")
    assert config.rate_limit_groups == (
        ("shared", RateLimitConfig(ops=BucketConfig(size=200, refill_ms=1000))),)


def test_limits_survive_the_api_round_trip(vm_dir: Path) -> None:
    from avmm.config import config_from_dict

    config = load(vm_dir, """
[[disk]]
path = "disk.img"
rate_limit = { ops = { size = 5, refill_ms = 10, one_time_burst = 3 } }
[[disk]]
path = "disk.img"
rate_limit_group = "g"
[[net]]
tap = "avmmrl0"
rx_rate_limit = { bandwidth = { size = 1000, refill_ms = 1 } }
tx_rate_limit_group = "g"
[rate_limit_groups.g]
bandwidth = { size = 4096, refill_ms = 1000 }
""")
    again = config_from_dict(config_to_dict(config), base_dir=None, source=config.source)
    assert again == config


def test_an_empty_rate_limit_is_unlimited(vm_dir: Path) -> None:
    config = load(vm_dir, '[[disk]]\npath = "disk.img"\nrate_limit = {}\n')
    assert config.disks[0].rate_limit is None


@pytest.mark.parametrize(("text", "key", "words"), [
    ('[[disk]]\npath = "disk.img"\nrate_limit = { ops = { size = 0, refill_ms = 1 } }\n',
     "disk[0].rate_limit.ops.size", "expected an integer from 1"),
    ('[[disk]]\npath = "disk.img"\nrate_limit = { ops = { size = 10 } }\n',
     "disk[0].rate_limit.ops.refill_ms", 'missing required key "refill_ms"'),
    ('[[disk]]\npath = "disk.img"\nrate_limit = { ops = { size = 1, refill_ms = -5 } }\n',
     "disk[0].rate_limit.ops.refill_ms", "expected an integer from 1 to 3600000"),
    ('[[disk]]\npath = "disk.img"\nrate_limit = { bandwidth = { size = 1, refill_ms = 1, '
     'one_time_burst = true } }\n',
     "disk[0].rate_limit.bandwidth.one_time_burst", "true (a boolean)"),
    ('[[disk]]\npath = "disk.img"\nrate_limit = { iops = { size = 1, refill_ms = 1 } }\n',
     "disk[0].rate_limit.iops", 'did you mean "ops"'),
    ('[[disk]]\npath = "disk.img"\nrate_limit = 500\n',
     "disk[0].rate_limit", "expected a table"),
    ('[[disk]]\npath = "disk.img"\nrate_limit_group = "nope"\n',
     "disk[0].rate_limit_group", "no [rate_limit_groups.nope]"),
    ('[[disk]]\npath = "disk.img"\nrate_limit_group = "g"\n'
     'rate_limit = { ops = { size = 1, refill_ms = 1 } }\n'
     '[rate_limit_groups.g]\nops = { size = 1, refill_ms = 1 }\n',
     "disk[0].rate_limit_group", "not both"),
    ('[[net]]\ntap = "avmmrl0"\nrate_limit = { ops = { size = 1, refill_ms = 1 } }\n',
     "net[0].rate_limit", 'did you mean "tx_rate_limit"'),
    ('[[net]]\ntap = "avmmrl0"\nrx_rate_limit_group = "x y"\n',
     "net[0].rx_rate_limit_group", "expected a group name"),
    ('[rate_limit_groups.g]\n', "rate_limit_groups.g", "needs a bandwidth or an ops"),
    ('[rate_limit_groups]\n"a b" = { ops = { size = 1, refill_ms = 1 } }\n',
     'rate_limit_groups."a b"', "expected a group name"),
    ('[rate_limit_groups.g]\nops = { size = 1, refill_ms = 1, burst = 3 }\n',
     "rate_limit_groups.g.ops.burst", "known keys are one_time_burst"),
])
def test_bad_limits_name_the_key(vm_dir: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(vm_dir, text)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_a_vhost_user_device_takes_its_limits_from_the_back_end(vm_dir: Path) -> None:
    path = vm_dir / "vu.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        for text, key in (
                (f'[[disk]]\nvhost_user = "{path}"\nrate_limit = '
                 '{ ops = { size = 1, refill_ms = 1 } }\n', "disk[0].rate_limit"),
                (f'[[net]]\nvhost_user = "{path}"\ntx_rate_limit = '
                 '{ ops = { size = 1, refill_ms = 1 } }\n', "net[0].tx_rate_limit")):
            with pytest.raises(ConfigError) as caught:
                load(vm_dir, text)
            assert caught.value.key == key
            assert "back-end" in str(caught.value)


def test_parse_rate_limit_for_the_api() -> None:
    assert parse_rate_limit(None, "disks[0].rate_limit") is None
    assert parse_rate_limit({"ops": {"size": 2, "refill_ms": 3}}, "x") == RateLimitConfig(
        ops=BucketConfig(size=2, refill_ms=3))
    with pytest.raises(ConfigError) as caught:
        parse_rate_limit({"ops": {"size": "2", "refill_ms": 3}}, "disks[0].rate_limit",
                         source="request body")
    assert caught.value.key == "disks[0].rate_limit.ops.size"


def test_a_misspelt_groups_table_is_pointed_at_the_right_one(vm_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(vm_dir, "[rate_limit_group.g]\nops = { size = 1, refill_ms = 1 }\n")
    assert caught.value.key == "rate_limit_group"
    assert "did you mean [rate_limit_groups]?" in str(caught.value)


def test_a_daemon_group_may_be_named_without_being_defined(vm_dir: Path) -> None:
    from avmm.config import config_from_dict

    data = {"boot": {"kernel": "vmlinux"},
            "disk": [{"path": "disk.img", "rate_limit_group": "tenant"}]}
    config = config_from_dict(data, base_dir=vm_dir, shared_groups=frozenset({"tenant"}))
    assert config.disks[0].rate_limit_group == "tenant"
    assert config.rate_limit_groups == ()
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, base_dir=vm_dir)
    assert caught.value.key == "disk[0].rate_limit_group"
