"""The config saved in a snapshot is checked on restore exactly as a config file or an API
request is (avmm/config.py's parsers), and under the daemon's ``--allow-path``: a state
file with a valid SHA-256 proves only that it is whole, not that avmm wrote it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from avmm.config import DiskConfig, NetConfig
from avmm.errors import PathNotAllowedError, StateError
from avmm.paths import PathPolicy
from avmm.state.vm_state import (
    ConfigState,
    DiskConfigState,
    NetConfigState,
    OutputConfigState,
    config_from_state,
    config_to_state,
)
from tests.vm.helpers import guest_config


@pytest.fixture
def area(tmp_path: Path) -> Path:
    (tmp_path / "allowed").mkdir()
    (tmp_path / "outside").mkdir()
    for where in ("allowed", "outside"):
        (tmp_path / where / "disk.img").write_bytes(bytes(4096))
    return tmp_path


@pytest.fixture
def policy(area: Path) -> Iterator[PathPolicy]:
    paths = PathPolicy([area / "allowed"])
    yield paths
    paths.close()


def saved(area: Path, **changes: Any) -> ConfigState:
    config = dataclasses.replace(
        guest_config("avmm.test=hello"),
        disks=(DiskConfig(path=area / "allowed" / "disk.img"),),
        nets=(NetConfig(tap="tap-hostile"),))
    return dataclasses.replace(config_to_state(config), **changes)


def net(**fields: Any) -> list[NetConfigState]:
    return [dataclasses.replace(NetConfigState(tap="tap-hostile", mac=None, netns=None,
                                               vhost_user=None), **fields)]


def disk(area: Path, **fields: Any) -> list[DiskConfigState]:
    return [dataclasses.replace(DiskConfigState(path=str(area / "allowed" / "disk.img"),
                                                readonly=False, id=None, vhost_user=None),
                                **fields)]


def test_the_saved_config_itself_is_accepted(area: Path, policy: PathPolicy) -> None:
    config = config_from_state(saved(area), source="state.avmm", path_check=policy.check)
    assert config.disks[0].path == area / "allowed" / "disk.img"
    assert config.nets[0].tap == "tap-hostile"


@pytest.mark.parametrize(("field", "value", "key"), [
    ("netns", "/proc/1/ns/net", "net[0].netns"),
    ("netns", "..", "net[0].netns"),
    ("netns", "../../tmp/x", "net[0].netns"),
    ("netns", "no-such-netns-here", "net[0].netns"),
    ("mac", bytes([1, 2, 3, 4, 5, 6]), "net[0].mac"),  # multicast
    ("mac", bytes(5), "net[0].mac"),
    ("tap", "a/b", "net[0].tap"),
    ("tap", "x" * 16, "net[0].tap"),
])
def test_a_bad_saved_nic_is_refused(area: Path, field: str, value: Any, key: str) -> None:
    with pytest.raises(StateError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config_from_state(saved(area, nets=net(**{field: value})), source="state.avmm")


@pytest.mark.parametrize("value", ["", "a\x01b", "\u00e9t\u00e9", "x" * 21])
def test_a_bad_saved_disk_id_is_refused(area: Path, value: str) -> None:
    with pytest.raises(StateError, match=r"disk\[0\]\.id"):
        config_from_state(saved(area, disks=disk(area, id=value)), source="state.avmm")


@pytest.mark.parametrize("value", ["", "a b", "../x", "x" * 65, "a\nb"])
def test_a_bad_saved_name_is_refused(area: Path, value: str) -> None:
    with pytest.raises(StateError, match="name"):
        config_from_state(saved(area, name=value), source="state.avmm")


def test_a_saved_tap_used_twice_is_refused(area: Path) -> None:
    with pytest.raises(StateError, match=r"net\[1\]\.tap"):
        config_from_state(saved(area, nets=net() * 2), source="state.avmm")


def test_a_saved_disk_outside_the_allowed_directories_is_refused(
        area: Path, policy: PathPolicy) -> None:
    state = saved(area, disks=disk(area, path=str(area / "outside" / "disk.img")))
    with pytest.raises(PathNotAllowedError, match=r"disk\[0\]\.path"):
        config_from_state(state, source="state.avmm", path_check=policy.check)


def test_a_saved_disk_escaping_with_dotdot_is_refused(area: Path,
                                                     policy: PathPolicy) -> None:
    escaping = str(area / "allowed" / ".." / "outside" / "disk.img")
    state = saved(area, disks=disk(area, path=escaping))
    with pytest.raises(PathNotAllowedError):
        config_from_state(state, source="state.avmm", path_check=policy.check)


def test_a_saved_serial_file_outside_the_allowed_directories_is_refused(
        area: Path, policy: PathPolicy) -> None:
    state = saved(area, serial=OutputConfigState(mode="file",
                                                 path=str(area / "outside" / "log")))
    with pytest.raises(PathNotAllowedError, match=r"serial\.path"):
        config_from_state(state, source="state.avmm", path_check=policy.check)


def test_a_saved_relative_disk_path_is_refused(area: Path) -> None:
    with pytest.raises(StateError, match=r"disk\[0\]\.path"):
        config_from_state(saved(area, disks=disk(area, path="disk.img")),
                          source="state.avmm")
