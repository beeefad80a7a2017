"""What a worker sends is hostile (it runs the guest's device models): every message the
daemon's side takes apart either becomes checked data or a ChannelError, never another
exception that would reach the daemon's nursery."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from avmm.isolation.channel import ChannelError, decode
from avmm.isolation.jail import UidAllocator
from avmm.isolation.worker_vm import ProcessIsolation, WorkerVm, sanitize_status
from tests.vm.helpers import guest_config

GOOD_STATUS = {
    "vm": {"state": "running", "uptime_s": 1.5, "exit": None, "vcpu_threads": [7],
           "rate_limits": {}, "name": "ignored", "config": {"disk": "/etc/shadow"}},
    "metrics": {"vcpu_exits": {"IoOut": 3}, "devices": {"blk0": {
        "kind": "blk", "requests": 1, "bytes": 512, "notifications": 1}}},
    "rate_limit_waits": [["blk0", "ops", 0.25]],
}


@pytest.mark.parametrize("data", [
    b"[" * 5000, b"{" * 5000, b"1" * 5000, b'{"a": NaN}', b'{"a": Infinity}',
    b"\xff\xfe", b"", b"[]", b'"text"', b"{'a': 1}",
])
def test_malformed_packets_are_channel_errors(data: bytes) -> None:
    with pytest.raises(ChannelError):
        decode(data)


def test_a_status_keeps_only_checked_fields_the_daemon_shows() -> None:
    kept = sanitize_status(json.loads(json.dumps(GOOD_STATUS)))
    assert "name" not in kept["vm"] and "config" not in kept["vm"]
    assert kept["vm"]["vcpu_threads"] == [7]
    assert kept["metrics"]["devices"]["blk0"]["bytes"] == 512


def _mutations(value: Any, rng: random.Random) -> Any:
    """``value`` with one node somewhere replaced by something of another shape."""
    hostile = [None, True, -1, 1 << 70, 1e308, "x" * 5000, [], {}, [[[]]], {"a": {}},
               "running", [1, 2, 3], {"kind": 5}]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        return {**value, key: _mutations(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        return [*value[:index], _mutations(value[index], rng), *value[index + 1:]]
    return rng.choice(hostile)


def test_thousands_of_mangled_statuses_are_refused_as_channel_errors_only() -> None:
    vm = WorkerVm("vm-test", guest_config("avmm.test=hello"), start=True, paths=None,
                  isolation=ProcessIsolation(uids=UidAllocator((64900, 64901))))
    rng = random.Random(11)
    refused = 0
    for _ in range(3000):
        status = _mutations(GOOD_STATUS, rng)
        for message in ({"event": "status", "status": status},
                        {"event": "exited", "status": status}):
            try:
                vm._event(message)
            except ChannelError:
                refused += 1
            else:
                vm.to_dict()  # whatever was kept can be shown
                json.dumps(vm.to_dict(), allow_nan=False)
    assert refused > 1000  # most mutations are refused, none raised anything else
    for message in ({"id": 99, "result": {}}, {"id": "x"}, {"event": "console", "data": 5},
                    {"event": "console", "data": "!!"}, {"event": "nope"}, {}):
        with pytest.raises(ChannelError):
            vm._event(message)


def test_a_restored_config_must_be_the_one_the_daemon_checked(tmp_path: Any) -> None:
    """The worker reads the snapshot again (its jail holds only the directory's fd): a
    state file rewritten since the daemon's check (a disk path through the worker's
    /proc/self/fd would lead out of the jail) fails the restore."""
    import dataclasses

    from avmm.config import DiskConfig
    from avmm.host import config_to_dict
    from avmm.isolation.worker import _Worker, parse_start
    from avmm.isolation.worker_vm import worker_config
    from avmm.state import SnapshotError

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512))
    saved = dataclasses.replace(guest_config("avmm.test=echo"),
                                disks=(DiskConfig(disk),))
    checked = worker_config(saved)
    request = parse_start({"op": "start", "vm_id": "vm-test", "start": True,
                           "config": config_to_dict(checked), "jail": None,
                           "restore": {"path": str(tmp_path), "copy_memory": False,
                                       "vhost_user": {}}})
    worker = _Worker(None, request)  # type: ignore[arg-type]
    assert config_to_dict(worker.adjust_restored(saved)) == config_to_dict(checked)
    swapped = dataclasses.replace(saved, disks=(DiskConfig(tmp_path / "elsewhere.img"),))
    with pytest.raises(SnapshotError, match="changed after the daemon checked it"):
        worker.adjust_restored(swapped)


@pytest.mark.parametrize("groups", [
    "tenant", ["tenant", "tenant"], ["../tenant"], [""], [7], [None],
    [f"g{index}" for index in range(17)],
])
def test_a_start_message_s_rate_limit_groups_are_distinct_group_names(groups: Any) -> None:
    """The daemon-wide groups whose shared memory comes with the start message: a list
    of at most 16 distinct group names, or the start message is refused."""
    from avmm.isolation.worker import parse_start

    message = {"op": "start", "vm_id": "vm-test", "start": True, "config": {},
               "jail": None}
    assert parse_start({**message, "rate_limit_groups": ["tenant", "b-2"]}).groups == (
        "tenant", "b-2")
    assert parse_start(message).groups == ()
    with pytest.raises(ChannelError, match="rate_limit_groups"):
        parse_start({**message, "rate_limit_groups": groups})


def test_a_worker_is_handed_each_daemon_group_its_vm_names_once_and_no_other() -> None:
    import dataclasses

    from avmm.config import DiskConfig, NetConfig
    from avmm.errors import ConfigError
    from avmm.isolation.worker_vm import MAX_SHARED_GROUPS, daemon_groups_named
    from avmm.ratelimit import BucketConfig, RateLimitConfig

    own = RateLimitConfig(ops=BucketConfig(size=1, refill_ms=1))
    config = dataclasses.replace(
        guest_config("avmm.test=echo"),
        disks=(DiskConfig("/a.img", rate_limit_group="tenant"),
               DiskConfig("/b.img", rate_limit_group="mine"),
               DiskConfig("/c.img", rate_limit_group="tenant")),
        nets=(NetConfig(tap="tap0", tx_rate_limit_group="uplink",
                        rx_rate_limit_group="tenant"),),
        rate_limit_groups=(("mine", own),))
    assert daemon_groups_named(config) == [("disk[0].rate_limit_group", "tenant"),
                                           ("net[0].tx_rate_limit_group", "uplink")]
    many = dataclasses.replace(config, disks=tuple(
        DiskConfig(f"/{index}.img", rate_limit_group=f"g{index}")
        for index in range(MAX_SHARED_GROUPS + 1)), nets=())
    with pytest.raises(ConfigError) as refused:
        WorkerVm("vm-test", many, start=True, paths=None,
                 isolation=ProcessIsolation(uid=1, gid=1))
    assert refused.value.key == f"disk[{MAX_SHARED_GROUPS}].rate_limit_group"


def test_an_incoming_config_must_be_the_one_the_daemon_read(tmp_path: Any) -> None:
    """An incoming VM given no config: the worker reads the stream's config itself and
    builds only if it is the one the daemon read from the same bytes and planned the
    jail from (the start message's); an ``auto`` CPU profile is the daemon's."""
    import base64
    import dataclasses

    from avmm.config import DiskConfig
    from avmm.host import config_to_dict
    from avmm.isolation.worker import _Worker, parse_start
    from avmm.isolation.worker_vm import worker_config
    from avmm.migration.errors import MigrationError

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512))
    streamed = dataclasses.replace(guest_config("avmm.test=echo", cpu_profile="auto"),
                                   disks=(DiskConfig(disk),))
    planned = worker_config(dataclasses.replace(streamed, machine=dataclasses.replace(
        streamed.machine, cpu_profile="compat")))
    message = {"op": "start", "vm_id": "vm-test", "start": True,
               "config": config_to_dict(planned), "jail": None,
               "incoming": {"listen": "unix:/run/in.sock", "accept_timeout_s": None,
                            "received": base64.b64encode(b"AVMMMIGR...").decode()}}
    request = parse_start(message)
    assert request.incoming is not None and request.incoming["received"] == b"AVMMMIGR..."
    worker = _Worker(None, request)  # type: ignore[arg-type]
    built = worker.adjust_incoming(streamed)
    assert config_to_dict(built) == config_to_dict(planned)
    assert built.machine.cpu_profile == "compat"
    other = dataclasses.replace(streamed, disks=(DiskConfig(tmp_path / "elsewhere.img"),))
    with pytest.raises(MigrationError, match="not the one the daemon planned"):
        worker.adjust_incoming(other)
    for bad in (5, "not base64!", None):
        broken = {**message, "incoming": {**message["incoming"], "received": bad}}
        with pytest.raises(ChannelError, match="incoming"):
            parse_start(broken)


def test_a_worker_vm_needs_a_config_unless_its_stream_brings_it() -> None:
    from avmm.errors import VmStateError

    with pytest.raises(VmStateError, match="needs a config"):
        WorkerVm("vm-test", None, start=True, paths=None,
                 isolation=ProcessIsolation(uids=UidAllocator((64900, 64901))))


async def test_a_worker_vm_that_gets_no_uid_keeps_no_group_memory_open() -> None:
    """No uid left (every one of the range taken): the VM fails to start and the
    descriptors of the daemon-wide groups it named are closed, not left to pile up in
    the daemon with each such request."""
    import dataclasses
    import os

    import trio

    from avmm.config import DiskConfig
    from avmm.isolation.jail import JailError
    from avmm.ratelimit import BucketConfig, RateLimitConfig, SharedGroups

    groups = SharedGroups(across_processes=True)
    groups.create("tenant", RateLimitConfig(ops=BucketConfig(size=10, refill_ms=100)))
    try:
        config = dataclasses.replace(guest_config("avmm.test=echo"), disks=(
            DiskConfig("/nonexistent.img", rate_limit_group="tenant"),))
        isolation = ProcessIsolation(uids=UidAllocator((64990, 64990)))
        assert isolation.uids is not None
        isolation.uids.allocate()  # the only one
        vm = WorkerVm("vm-test", config, start=True, paths=None, isolation=isolation,
                      rate_limit_groups=groups)
        held = list(vm._group_fds.values())
        assert held
        with pytest.raises(JailError, match="in use"):
            await vm._run_worker(trio.TASK_STATUS_IGNORED)
        for fd in held:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        groups.close()
