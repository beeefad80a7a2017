"""``Host``: many VMs in one trio program, each on its own; console hub; metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.config import DiskConfig, config_from_dict
from avmm.errors import VmStartError, VmStateError
from avmm.host import (
    CONSOLE_BACKLOG_BYTES,
    ConsoleHub,
    ConsoleSubscription,
    DeviceMetrics,
    Host,
    HostedVm,
    UnknownVmError,
    VmState,
    config_to_dict,
)
from avmm.lifecycle import StopReason
from tests.virtio_guest_support import expected_pattern
from tests.vm.helpers import MAILBOX_ADDRESS, guest_config, tiny_elf

COUNTER = MAILBOX_ADDRESS + 8

kvm = [pytest.mark.kvm, pytest.mark.guest]


async def output_until(subscription: ConsoleSubscription, text: str) -> str:
    """Read ``subscription`` until ``text`` has appeared; return everything read."""
    seen = ""
    with trio.fail_after(60):
        async for chunk in subscription:
            seen += chunk.decode()
            if text in seen:
                return seen
    raise AssertionError(f"the console ended before {text!r}; it said {seen!r}")


async def wait_for_progress(hosted: HostedVm) -> None:
    memory = hosted.vm.memory
    assert memory is not None
    with trio.fail_after(60):
        # State first: a stopped VM's memory is gone (no await between the two).
        while hosted.state is VmState.RUNNING and memory.read_u64(COUNTER) == 0:
            await trio.sleep(0.005)


# -- many VMs ---------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.guest
async def test_twenty_vms_created_paused_resumed_and_removed_concurrently() -> None:
    n = 300_000_000
    results: dict[int, tuple[str, StopReason]] = {}

    async def one(host: Host, index: int) -> None:
        hosted = await host.create(guest_config(f"avmm.test=count avmm.n={n} vm={index}",
                                                memory_mib=16))
        assert hosted in host.list()
        for _ in range(2):
            await wait_for_progress(hosted)
            try:
                await hosted.pause()
            except VmStateError:
                break  # the count finished first: nothing left to pause
            assert hosted.state is VmState.PAUSED
            await trio.sleep(0.01)
            await hosted.resume()
        result = await hosted.wait()
        results[index] = (hosted.console_backlog().decode(), result.reason)
        assert await host.remove(hosted.id)
        assert hosted not in host.list()

    async with Host() as host, trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(one, host, index)
    assert sorted(results) == list(range(20))
    for index, (output, reason) in results.items():
        # The guest prints its own count of iterations done.
        assert output.endswith(f"avmm-testguest: count done n={n}\n"), index
        assert reason is StopReason.RESET


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_crashing_vm_is_reported_stopped_while_its_neighbours_run(
        tmp_path: Path) -> None:
    kernel = tiny_elf(tmp_path / "ud2.elf", b"\x0f\x0b")  # #UD without an IDT: triple fault
    async with Host() as host:
        neighbours = [await host.create(guest_config("avmm.test=count avmm.n=100000000000000"))
                      for _ in range(2)]
        crash = await host.create(guest_config("", kernel=kernel))
        result = await crash.wait()
        assert crash.state is VmState.STOPPED
        assert result.reason is StopReason.TRIPLE_FAULT
        assert crash.to_dict()["exit"]["reason"] == "triple-fault"
        for hosted in neighbours:
            assert hosted.state is VmState.RUNNING
            await wait_for_progress(hosted)
        await host.stop_all()
        for hosted in neighbours:
            assert hosted.exit is not None and hosted.exit.reason is StopReason.STOPPED
        assert [hosted.state for hosted in host.list()] == [VmState.STOPPED] * 3


# -- lifecycle through the Host -----------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.guest
async def test_host_operations_and_their_errors() -> None:
    async with Host() as host:
        hosted = await host.create(guest_config("avmm.test=count avmm.n=100000000000000",
                                                name="counter"))
        assert host.get(hosted.id) is hosted
        assert hosted.id.startswith("vm-") and hosted.name == "counter"
        with pytest.raises(UnknownVmError, match="no VM with id 'vm-nope'"):
            host.get("vm-nope")
        assert await host.remove("vm-nope") is False
        with pytest.raises(VmStateError):
            await hosted.resume()
        await hosted.pause()
        with pytest.raises(VmStateError):
            await hosted.pause()
        assert host.metrics()[hosted.id].state is VmState.PAUSED
        result = await hosted.stop()  # stopping a paused VM
        assert result.reason is StopReason.STOPPED
        assert await hosted.stop() == result  # idempotent
        assert hosted.state is VmState.STOPPED
        uptime = hosted.uptime_s
        assert uptime is not None and uptime > 0
        assert hosted.uptime_s == uptime  # frozen once stopped
        with pytest.raises(VmStateError):
            await hosted.send_console(b"x")
        assert await host.remove(hosted.id) is True
        assert await host.remove(hosted.id) is False
        with pytest.raises(VmStartError, match="loading the kernel"):
            await host.create(guest_config("", kernel=Path("/dev/null")))
        assert host.list() == []
    with pytest.raises(VmStateError, match="not running"):
        await host.create(guest_config("avmm.test=hello"))


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_vm_created_without_start_waits_paused() -> None:
    async with Host() as host:
        hosted = await host.create(guest_config("avmm.test=hello"), start=False)
        assert hosted.state is VmState.PAUSED
        await trio.sleep(0.02)
        assert hosted.console_backlog() == b""
        await hosted.resume()
        result = await hosted.wait()
    assert result.reason is StopReason.RESET
    assert b"avmm-testguest: hello\n" in hosted.console_backlog()


def record_flushes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the file behind every fd that is fdatasync-ed or fsync-ed from now on (the
    calls still happen). A flush test must check the call, not the file's contents:
    the page cache would show the data whether or not it was ever made stable."""
    import os

    synced: list[str] = []
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)

        def recording(fd: int, real: Any = real) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, name, recording)
    return synced


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_vm_created_without_start_has_no_uptime_until_it_runs() -> None:
    """README: ``uptime_s`` is "null before it ran". A VM created with start=False has
    not run a single guest instruction until it is resumed."""
    async with Host() as host:
        hosted = await host.create(guest_config("avmm.test=hello"), start=False)
        assert hosted.state is VmState.PAUSED
        assert hosted.uptime_s is None
        assert hosted.to_dict()["uptime_s"] is None
        await hosted.resume()
        assert hosted.uptime_s is not None
        await hosted.wait()


@pytest.mark.kvm
@pytest.mark.guest
async def test_leaving_the_host_stops_every_vm_and_flushes_its_disks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer never sends FLUSH (avmm.flush=0): its data sits in the device's write
    cache, and only the host's shutdown makes it stable; the spinner's disk was never
    written and is flushed all the same (the host cannot know that)."""
    synced = record_flushes(monkeypatch)
    disk, idle_disk = tmp_path / "disk.img", tmp_path / "idle.img"
    disk.write_bytes(bytes(64 * 1024))
    idle_disk.write_bytes(bytes(4096))
    config = dataclasses.replace(guest_config("avmm.test=blk-write avmm.seed=7 avmm.flush=0"),
                                 disks=(DiskConfig(path=disk),))
    async with Host() as host:
        writer = await host.create(config)
        spinner = await host.create(dataclasses.replace(
            guest_config("avmm.test=count avmm.n=100000000000000"),
            disks=(DiskConfig(path=idle_disk),)))
        await writer.wait()
        await wait_for_progress(spinner)
        # The writer stopped on its own (a reset) and was flushed then; the spinner not yet.
        assert synced == [str(disk)]
        synced.clear()
    assert synced == [str(idle_disk)]
    output = writer.console_backlog().decode()
    assert "blk0 flush=skipped (avmm.flush=0)" in output
    assert "blk0 written=128 verify=ok" in output
    assert disk.read_bytes() == expected_pattern(7, 128)
    assert spinner.exit is not None
    assert spinner.exit.reason is StopReason.STOPPED
    assert spinner.exit.detail == "the host is shutting down"
    metrics = writer.metrics()
    blk = metrics.devices["blk0"]
    assert blk.kind == "blk"
    assert blk.requests > 0 and blk.bytes >= 64 * 1024 and blk.notifications > 0
    assert metrics.vcpu_exits["IoOut"] > 0


@pytest.mark.kvm
@pytest.mark.guest
async def test_to_dict_is_json_with_a_config_that_round_trips(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    config = dataclasses.replace(guest_config("avmm.test=hello", name="web-1"),
                                 disks=(DiskConfig(path=disk, readonly=True, id="d1"),))
    async with Host() as host:
        hosted = await host.create(config)
        await hosted.wait()
        data = json.loads(json.dumps(hosted.to_dict()))
    assert data["id"] == hosted.id and data["name"] == "web-1"
    assert data["state"] == "stopped"
    assert data["exit"] == {"reason": "reset", "exit_status": 0,
                            "detail": "the guest reset the machine (i8042)"}
    assert isinstance(data["created_at"], float) and data["uptime_s"] > 0
    again = config_from_dict(data["config"], base_dir=None, source="test")
    assert again == config


# -- the console --------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.guest
async def test_console_subscribe_detach_and_backlog() -> None:
    async with Host() as host:
        hosted = await host.create(guest_config("avmm.test=echo"))
        async with hosted.subscribe_console() as first:
            await output_until(first, "echo ready")
            await hosted.send_console(b"one\n")
            await output_until(first, "echo one")
        # Detached: the iteration is over, the VM runs on.
        assert [chunk async for chunk in first] == []
        assert hosted.state is VmState.RUNNING
        second = hosted.subscribe_console()
        third = hosted.subscribe_console()
        # A late subscriber starts with the backlog.
        backlog = await output_until(second, "echo one")
        assert backlog.startswith("avmm-testguest: echo ready")
        await hosted.send_console(b"quit\n")
        assert "echo bye" in await output_until(third, "echo bye")
        await hosted.wait()
        rest = b"".join([chunk async for chunk in second]).decode()
        assert "echo bye" in rest  # a subscription ends only after the last output
        late = hosted.subscribe_console()
        assert b"".join([chunk async for chunk in late]) == hosted.console_backlog()
    assert hosted.console_backlog().decode().endswith("avmm-testguest: echo bye\n")


async def test_console_hub_bounds_the_backlog_and_slow_subscribers() -> None:
    hub = ConsoleHub()
    reader = hub.subscribe()
    slow = ConsoleSubscription(hub, b"", limit=1000)
    hub._subscribers.append(slow)
    for index in range(100):
        hub.feed(bytes([index]) * 1024)
    assert len(hub.backlog()) == CONSOLE_BACKLOG_BYTES
    assert hub.backlog()[-1024:] == bytes([99]) * 1024
    assert await slow.__anext__() == bytes([99]) * 1000  # oldest bytes dropped
    assert slow.dropped == 100 * 1024 - 1000
    assert len(await reader.__anext__()) == 100 * 1024  # within its limit: all of it
    await reader.aclose()
    hub.feed(b"after")
    hub.end()
    assert [chunk async for chunk in reader] == []  # detached before "after"
    assert [chunk async for chunk in slow] == [b"after"]  # then the end


def test_config_to_dict_round_trips_every_section(tmp_path: Path) -> None:
    import socket

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    (tmp_path / "disk.img").write_bytes(bytes(512))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "fs.sock"))
    try:
        data = {
            "name": "full",
            "machine": {"vcpus": 2, "memory_mib": 64, "hide_cpu_features": ["x2apic"],
                        "acpi": False},
            "boot": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
            "serial": {"mode": "file", "path": str(tmp_path / "serial.log")},
            "disk": [{"path": str(tmp_path / "disk.img"), "readonly": True, "id": "d0"}],
            "net": [{"tap": "tap-x", "mac": "52:54:00:12:34:56"}],
            "rng": {},
            "console": {"mode": "socket", "path": str(tmp_path / "console.sock")},
            "vhost_user": [{"socket": str(tmp_path / "fs.sock"), "device_id": 26,
                            "num_queues": 2, "queue_size": 128}],
        }
        config = config_from_dict(data, base_dir=None)
        round_tripped = config_to_dict(config)
        assert config_from_dict(json.loads(json.dumps(round_tripped)),
                                base_dir=None) == config
    finally:
        listener.close()
    assert round_tripped["net"] == [{"tap": "tap-x", "mac": "52:54:00:12:34:56"}]
    assert round_tripped["rng"] == {}


@pytest.mark.kvm
@pytest.mark.guest
async def test_vhost_user_devices_report_requests_from_the_used_ring(tmp_path: Path) -> None:
    import zlib

    from tests.vhost.test_frontend import avmm_backend, blk_config, random_image

    image = random_image(tmp_path / "disk.img", 256 * 1024)
    sock = tmp_path / "blk.sock"
    with avmm_backend("blk", sock, "--image", str(image)):
        async with Host() as host:
            hosted = await host.create(blk_config("avmm.test=blk-crc", sock))
            await hosted.wait()
    assert f"crc32={zlib.crc32(image.read_bytes()):08x}" in hosted.console_backlog().decode()
    blk = hosted.metrics().devices["blk0"]
    # Reads of at most 64 KiB: at least 4 requests; the data path bypassed avmm, so
    # bytes and kicks are not known here.
    assert blk == DeviceMetrics(kind="vhost-user", requests=blk.requests)
    assert blk.requests >= 4


@pytest.mark.kvm
@pytest.mark.guest
async def test_stopping_a_vm_fdatasyncs_its_writable_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped from outside (as `avmm serve` does on SIGTERM), a VM makes its writable
    disks stable before it counts as stopped; read-only disks are left alone."""
    synced = record_flushes(monkeypatch)
    writable, read_only = tmp_path / "rw.img", tmp_path / "ro.img"
    writable.write_bytes(bytes(4096))
    read_only.write_bytes(bytes(4096))
    config = dataclasses.replace(
        guest_config("avmm.test=count avmm.n=100000000000000"),
        disks=(DiskConfig(path=writable), DiskConfig(path=read_only, readonly=True)))
    async with Host() as host:
        hosted = await host.create(config)
        await wait_for_progress(hosted)
        assert synced == []  # the guest never touched its disks
        await hosted.stop()
    assert synced == [str(writable)]
