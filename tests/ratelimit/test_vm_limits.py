"""Rate limits on a real VM through the daemon: the test guest's blk-bench against a disk
limited in its config, and a limit set and removed with PATCH while it runs. Checked by
the limiter's accounting against the device's own counters (no speed targets; the one
time bound is a lower bound that noise can only make larger)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.host import Host
from tests.api.test_metrics_real import parse_metrics, value
from tests.ratelimit.support import admits
from tests.vm.helpers import TEST_GUEST, with_machine

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

OPS_SIZE, REFILL_MS = 5, 100  # 50 requests per second, no burst


def _config(image: Path, cmdline: str, **disk: object) -> dict[str, object]:
    return {"machine": {"memory_mib": 32, "acpi": False},
            "boot": {"kernel": str(TEST_GUEST), "cmdline": cmdline},
            "disk": [{"path": str(image), **disk}]}


def _requests(stats: object) -> int:
    return sum(getattr(stats, name) for name in (
        "reads", "writes", "flushes", "get_ids", "discards", "write_zeroes", "unsupported"))


async def test_a_limited_disk_admits_every_request_through_its_buckets(
        socket_dir: Path) -> None:
    image = socket_dir / "disk.img"
    image.write_bytes(bytes(4 << 20))
    count = 60
    config = _config(image, f"avmm.test=blk-bench avmm.rw=read avmm.qd=4 avmm.n={count}",
                     rate_limit={"ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}})
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            vm_id = (await api.create_vm(config))["id"]
            hosted = host.get(vm_id)
            with trio.fail_after(120):
                await hosted.wait()
            shown = (await api.get_vm(vm_id))["rate_limits"]["disks"][0]
            metrics = parse_metrics(await api.metrics())
            nursery.cancel_scope.cancel()
    assert f"blk-bench rw=read qd=4 n={count} done".encode() in hosted.console_backlog()
    device = hosted.vm.virtio_slots[0].device
    stats = device.stats
    assert stats.reads >= count
    # Every request the device served went through the limiter, with its data bytes.
    assert shown["admitted_ops"] == _requests(stats)
    assert shown["admitted_bytes"] == stats.bytes_read + stats.bytes_written + 20 * stats.get_ids
    assert shown["rate_limit"] == {"ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}}
    assert shown["throttled"] >= 1
    waited = shown["wait_seconds"]["ops"]
    assert waited > 0 and shown["wait_seconds"]["bandwidth"] == 0
    assert value(metrics, "avmm_ratelimit_wait_seconds_total", vm=vm_id, device="blk0",
                 kind="ops") == pytest.approx(waited)
    # No burst: past the bucket's first OPS_SIZE, each request needed its 1/50 s.
    uptime = hosted.uptime_s
    assert uptime is not None
    assert uptime >= (shown["admitted_ops"] - OPS_SIZE) * REFILL_MS / OPS_SIZE / 1000


async def test_patch_puts_a_limit_on_a_running_disk_and_takes_it_off(
        socket_dir: Path) -> None:
    image = socket_dir / "disk.img"
    image.write_bytes(bytes(4 << 20))
    config = _config(image, "avmm.test=blk-bench avmm.rw=read avmm.n=1000000000")
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            vm_id = (await api.create_vm(config))["id"]
            hosted = host.get(vm_id)
            device = hosted.vm.virtio_slots[0].device
            assert device.throttle is None
            with trio.fail_after(60):
                while device.stats.reads < 10:
                    await trio.sleep(0.05)
            limit = {"ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}}
            vm = await api.update_limits(vm_id, {"disks": [{"index": 0, "rate_limit": limit}]})
            assert vm["rate_limits"]["disks"][0]["rate_limit"] == limit
            throttle = device.throttle
            assert throttle is not None
            # The guest keeps asking faster than 50/s: requests wait for their tokens.
            with trio.fail_after(60):
                while throttle.throttled < 3 or throttle.admitted_ops < 2 * OPS_SIZE:
                    await trio.sleep(0.05)
            vm = await api.update_limits(vm_id, {"disks": [{"index": 0, "rate_limit": None}]})
            shown = vm["rate_limits"]["disks"][0]
            assert shown["rate_limit"] is None
            assert shown["admitted_ops"] >= 2 * OPS_SIZE and shown["wait_seconds"]["ops"] > 0
            assert device.throttle is None
            # Unlimited again: the guest goes on (past whatever request was held).
            reads = device.stats.reads
            with trio.fail_after(60):
                while device.stats.reads < reads + 50:
                    await trio.sleep(0.05)
            missing = await api._http.patch(f"/vms/{vm_id}", json={
                "disks": [{"index": 1, "rate_limit": limit}]})
            assert missing.status_code == 404
            await api.stop(vm_id)
            nursery.cancel_scope.cancel()


@pytest.mark.net
async def test_a_limited_nic_passes_every_frame_through_its_direction_s_limiter(
        echoing_tap: tuple[str, str]) -> None:
    from avmm import VirtualMachine
    from avmm.config import NetConfig
    from avmm.ratelimit import BucketConfig, RateLimitConfig
    from tests.vm.helpers import guest_config

    tap, netns = echoing_tap
    rounds = 30
    limit = RateLimitConfig(ops=BucketConfig(size=2, refill_ms=20))  # 100 frames/s
    config = dataclasses.replace(
        guest_config(f"avmm.test=net-echo avmm.n={rounds} avmm.size=64", memory_mib=64),
        nets=(NetConfig(tap=tap, mac=bytes.fromhex("525400abcdef"), netns=netns,
                        tx_rate_limit=limit, rx_rate_limit=limit),))
    output = bytearray()
    started = time.monotonic()
    async with VirtualMachine(config) as vm:
        async for chunk in vm.serial:
            output += chunk
        await vm.wait()
        elapsed = time.monotonic() - started
        nic = vm.virtio_slots[0].device
        shown = vm.rate_limits.to_dict()["nets"][0]
    assert f"net0 echoed={rounds}".encode() in output, output
    stats = nic.stats
    tx, rx = shown["tx"], shown["rx"]
    # Every frame either way went through its own direction's limiter.
    assert tx["admitted_ops"] == stats.tx_frames + stats.tx_dropped >= rounds
    assert rx["admitted_ops"] == stats.rx_frames + stats.rx_dropped >= rounds
    assert tx["admitted_bytes"] == stats.tx_bytes
    assert rx["admitted_bytes"] == stats.rx_bytes
    assert tx["rate_limit"] == rx["rate_limit"] == limit.to_dict()
    # Past the first 2, each TX frame needed its 10 ms.
    assert elapsed >= (tx["admitted_ops"] - 2) * 0.010


async def test_two_vms_naming_a_daemon_group_share_its_buckets(socket_dir: Path) -> None:
    count = 40
    images = [socket_dir / f"disk{i}.img" for i in range(2)]
    for image in images:
        image.write_bytes(bytes(4 << 20))
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            put = await api._http.put("/rate_limit_groups/tenant", json={
                "ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}})
            assert put.status_code == 201
            hosted = []
            started = time.monotonic()
            for image in images:
                config = _config(image, f"avmm.test=blk-bench avmm.rw=read avmm.qd=2 "
                                        f"avmm.n={count}", rate_limit_group="tenant")
                hosted.append(host.get((await api.create_vm(config))["id"]))
            with trio.fail_after(120):
                for vm in hosted:
                    await vm.wait()
            elapsed = time.monotonic() - started
            shown = [(await api.get_vm(vm.id))["rate_limits"] for vm in hosted]
            nursery.cancel_scope.cancel()
    devices = [vm.vm.virtio_slots[0].device for vm in hosted]
    group = host.rate_limit_groups.get("tenant")
    assert group is not None
    assert all(device.throttle.limiter is group for device in devices)
    assert all(s["shared_groups"] == ["tenant"] and
               s["disks"][0]["rate_limit_group"] == "tenant" for s in shown)
    admitted = [s["disks"][0]["admitted_ops"] for s in shown]
    for device, ops in zip(devices, admitted, strict=True):
        assert ops == _requests(device.stats) >= count
    # One bucket for both: past its first OPS_SIZE tokens, the two VMs' requests
    # together went at most 50 per second (over the whole span, both VMs' uptimes in it).
    assert elapsed >= (sum(admitted) - OPS_SIZE) * REFILL_MS / OPS_SIZE / 1000


async def test_a_snapshot_carries_the_limits_in_effect_and_the_restored_vm_has_them(
        tmp_path: Path) -> None:
    from avmm import VirtualMachine
    from avmm.config import DiskConfig
    from avmm.ratelimit import BucketConfig, RateLimitConfig
    from tests.cgroups.conftest import cgroup_cpu_problem
    from tests.prerequisites import require
    from tests.vm.helpers import guest_config

    require(cgroup_cpu_problem())
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    limit = RateLimitConfig(ops=BucketConfig(size=OPS_SIZE, refill_ms=REFILL_MS))
    changed = RateLimitConfig(ops=BucketConfig(size=2 * OPS_SIZE, refill_ms=REFILL_MS),
                              bandwidth=BucketConfig(size=1 << 20, refill_ms=100,
                                                     one_time_burst=4096))
    base = guest_config("avmm.test=blk-bench avmm.rw=read avmm.n=1000000000")
    config = dataclasses.replace(with_machine(base, cpu_weight=250),
                                 disks=(DiskConfig(image, rate_limit=limit),))
    async with VirtualMachine(config) as vm:
        await admits(vm.virtio_slots[0].device, 2 * OPS_SIZE)
        await vm.pause()
        await vm.snapshot(tmp_path / "as-configured")
        # Changed at run time (what PATCH /vms/{id} does): the next snapshot has these.
        vm.rate_limits.set("disk", 0, None, changed)
        await vm.set_cpu_limits(weight=500, max_percent=40.25)
        shown = vm.config_with_limits()  # what GET /vms/{id} shows as its config
        assert (shown.machine.cpu_weight, shown.machine.cpu_max_percent) == (500, 40.25)
        assert shown.disks[0].rate_limit == changed
        await vm.snapshot(tmp_path / "as-changed")
        vm.stop()
        await vm.wait()
    expected = [(tmp_path / "as-configured", limit, 250, None),
                (tmp_path / "as-changed", changed, 500, 40.25)]
    for snapshot, rate_limit, weight, max_percent in expected:
        async with VirtualMachine.restore(snapshot) as restored:
            assert restored.config.disks[0].rate_limit == rate_limit
            assert restored.rate_limits.to_dict()["disks"][0]["rate_limit"] == \
                rate_limit.to_dict()
            assert restored.cpu_limits.weight == restored.config.machine.cpu_weight == weight
            assert restored.cpu_limits.max_percent == max_percent
            assert restored.cpu_description()["weight"] == weight
            await admits(restored.virtio_slots[0].device, OPS_SIZE + 1)
            restored.stop()
            await restored.wait()


async def test_a_restored_vm_keeps_patched_limits_and_its_daemon_group_s_buckets(
        socket_dir: Path) -> None:
    """Through the daemon: disk 0 in a daemon group (whose buckets a PUT then changes),
    disk 1 limited by a PATCH; restored by another daemon that has no such group, the
    VM has both, the group as one of its own."""
    images = [socket_dir / f"disk{i}.img" for i in range(2)]
    for image in images:
        image.write_bytes(bytes(4 << 20))
    group = {"ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}}
    group_now = {"ops": {"size": 3 * OPS_SIZE, "refill_ms": REFILL_MS}}
    patched = {"bandwidth": {"size": 1 << 20, "refill_ms": 200}}
    config = _config(images[0], "avmm.test=blk-bench avmm.rw=read avmm.n=1000000000",
                     rate_limit_group="tenant")
    config["disk"].append({"path": str(images[1])})  # type: ignore[attr-defined]
    snapshot = socket_dir / "snap"
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as api:
            put = await api._http.put("/rate_limit_groups/tenant", json=group)
            assert put.status_code == 201
            vm_id = (await api.create_vm(config))["id"]
            await admits(host.get(vm_id).vm.virtio_slots[0].device, 2 * OPS_SIZE)
            await api.update_limits(vm_id, {"disks": [{"index": 1, "rate_limit": patched}]})
            put = await api._http.put("/rate_limit_groups/tenant", json=group_now)
            assert put.status_code == 200
            # GET's config shows the limits in effect, as the snapshot will save them
            # (the daemon's group named as posted: the snapshot copies its buckets).
            shown_config = (await api.get_vm(vm_id))["config"]
            assert shown_config["disk"][1]["rate_limit"] == patched
            assert shown_config["disk"][0]["rate_limit_group"] == "tenant"
            assert "rate_limit_groups" not in shown_config
            await api.pause(vm_id)
            await api.snapshot(vm_id, snapshot)
            await api.stop(vm_id)
            nursery.cancel_scope.cancel()
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm2.sock")
        async with ApiClient(path) as api:
            vm_id = (await api.restore_vm(snapshot))["id"]
            shown = (await api.get_vm(vm_id))["rate_limits"]
            assert shown["groups"] == {"tenant": group_now}
            assert shown["shared_groups"] == []
            assert shown["disks"][0]["rate_limit_group"] == "tenant"
            assert shown["disks"][0]["rate_limit"] == group_now
            assert shown["disks"][1]["rate_limit"] == patched
            assert shown["disks"][1]["rate_limit_group"] is None
            await admits(host.get(vm_id).vm.virtio_slots[0].device, 3 * OPS_SIZE + 1)
            await api.stop(vm_id)
            nursery.cancel_scope.cancel()
