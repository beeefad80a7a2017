"""Rate limits on a real VM through the daemon: the test guest's blk-bench against a disk
limited in its config, and a limit set and removed with PATCH while it runs. Checked by
the limiter's accounting against the device's own counters (no speed targets; the one
time bound is a lower bound that noise can only make larger)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.api.client import ApiError
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


# -- daemon-wide groups through a real `avmm serve`, in both isolation modes --------------


@contextlib.asynccontextmanager
async def _serve(isolation: str) -> AsyncIterator[tuple[ApiClient, Path]]:
    """``avmm serve --isolation ISOLATION`` (process mode: jailed workers, filters in
    kill mode) and a scratch directory for the disk images."""
    if isolation == "process":
        from tests.isolation.test_process_mode import process_daemon

        async with process_daemon() as (_daemon, api, jail_root):
            yield api, jail_root.parent
        return
    from tests.api.test_daemon import running_daemon

    with tempfile.TemporaryDirectory(prefix="avmm-rl-", dir="/tmp") as name:
        scratch = Path(name)
        async with running_daemon(scratch, isolation="none") as daemon, \
                ApiClient(daemon.socket) as api:
            yield api, scratch


async def _stopped(api: ApiClient, vm_id: str, timeout_s: float = 120) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while (vm := await api.get_vm(vm_id))["state"] != "stopped":
            await trio.sleep(0.05)
    return vm


async def _output(api: ApiClient, vm_id: str) -> bytes:
    """The console of a stopped VM (its backlog)."""
    output = bytearray()
    async with api.console(vm_id) as chunks:
        with trio.fail_after(30):
            async for chunk in chunks:
                output += chunk
    return bytes(output)


def _group_disk_config(scratch: Path, index: int, cmdline: str) -> dict[str, Any]:
    image = scratch / f"disk{index}.img"
    image.write_bytes(bytes(4 << 20))
    return _config(image, cmdline, rate_limit_group="tenant")


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_vms_in_either_isolation_mode_naming_a_daemon_group_share_its_buckets(
        isolation: str) -> None:
    """Two VMs (in process mode: two jailed workers) run blk-bench on disks naming one
    daemon group: every request of each went through the group's buckets, and the two
    together went no faster than the one bucket allows."""
    count = 40
    group = {"ops": {"size": OPS_SIZE, "refill_ms": REFILL_MS}}
    async with _serve(isolation) as (api, scratch):
        put = await api._http.put("/rate_limit_groups/tenant", json=group)
        assert put.status_code == 201, put.text
        started = time.monotonic()
        vms = [(await api.create_vm(_group_disk_config(
            scratch, index, f"avmm.test=blk-bench avmm.rw=read avmm.qd=2 avmm.n={count}"
        )))["id"] for index in range(2)]
        ended = [await _stopped(api, vm_id) for vm_id in vms]
        elapsed = time.monotonic() - started
        outputs = [await _output(api, vm_id) for vm_id in vms]
        metrics = parse_metrics(await api.metrics())
        shown_group = (await api._http.get("/rate_limit_groups/tenant")).json()
    for vm, output in zip(ended, outputs, strict=True):
        assert vm["isolation"] == isolation
        assert f"blk-bench rw=read qd=2 n={count} done".encode() in output, (vm, output)
        limits = vm["rate_limits"]
        assert limits["shared_groups"] == ["tenant"], limits
        disk = limits["disks"][0]
        assert disk["rate_limit_group"] == "tenant" and disk["rate_limit"] == group, disk
        # Every request the device completed went through the group's buckets.
        requests = value(metrics, "avmm_virtio_requests_total", vm=vm["id"],
                         device="blk0", kind="blk")
        assert disk["admitted_ops"] == requests >= count, (disk, requests)
    admitted = [vm["rate_limits"]["disks"][0]["admitted_ops"] for vm in ended]
    assert sum(vm["rate_limits"]["disks"][0]["throttled"] for vm in ended) >= 1
    # One bucket for both (separate buckets would have let them finish in about half
    # the time): past its first OPS_SIZE tokens, the two VMs' requests together went
    # at most 50 per second. A lower bound: noise only makes the run longer.
    assert elapsed >= (sum(admitted) - OPS_SIZE) * REFILL_MS / OPS_SIZE / 1000, \
        (elapsed, admitted)
    assert shown_group["rate_limit"] == group
    assert shown_group["tokens"]["ops"] <= OPS_SIZE


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_a_daemon_group_changed_by_put_reaches_its_vms_and_delete_keeps_them(
        isolation: str) -> None:
    """A VM all but stalled by its daemon group (one request a minute) finishes once a
    PUT widens the group (in process mode the worker reads the change from the group's
    shared memory); a DELETE leaves it the group, and a new VM cannot name it."""
    count = 20
    narrow = {"ops": {"size": 1, "refill_ms": 60_000}}
    wide = {"ops": {"size": 100_000, "refill_ms": 1000}}
    async with _serve(isolation) as (api, scratch):
        put = await api._http.put("/rate_limit_groups/tenant", json=narrow)
        assert put.status_code == 201, put.text
        vm_id = (await api.create_vm(_group_disk_config(
            scratch, 0, f"avmm.test=blk-bench avmm.rw=read avmm.n={count}")))["id"]
        with trio.fail_after(60):
            while (disk := (await api.get_vm(vm_id))["rate_limits"]["disks"][0])[
                    "throttled"] < 1:
                await trio.sleep(0.05)
        assert disk["rate_limit"] == narrow and disk["admitted_ops"] < count, disk
        put = await api._http.put("/rate_limit_groups/tenant", json=wide)
        assert put.status_code == 200, put.text
        assert put.json()["rate_limit"] == wide
        # The VM's devices see the group as it is now (the worker's own reading).
        assert (await api.get_vm(vm_id))["rate_limits"]["disks"][0]["rate_limit"] == wide
        vm = await _stopped(api, vm_id, timeout_s=60)
        output = await _output(api, vm_id)
        assert f"blk-bench rw=read qd=1 n={count} done".encode() in output, (vm, output)
        assert vm["rate_limits"]["disks"][0]["admitted_ops"] >= count

        # DELETE: a VM using the group keeps it; a new VM cannot name it.
        vm_id = (await api.create_vm(_group_disk_config(
            scratch, 1, "avmm.test=blk-bench avmm.rw=read avmm.n=1000000000")))["id"]
        await _admitted(api, vm_id, 10)
        deleted = await api._http.delete("/rate_limit_groups/tenant")
        assert deleted.status_code == 204
        assert (await api._http.get("/rate_limit_groups/tenant")).status_code == 404
        admitted = (await api.get_vm(vm_id))["rate_limits"]["disks"][0]["admitted_ops"]
        await _admitted(api, vm_id, admitted + 10)
        shown = (await api.get_vm(vm_id))["rate_limits"]
        assert shown["shared_groups"] == ["tenant"]
        assert shown["disks"][0]["rate_limit"] == wide
        with pytest.raises(ApiError) as refused:
            await api.create_vm(_group_disk_config(scratch, 2, "avmm.test=hello"))
        assert refused.value.status == 400
        assert refused.value.detail["key"] == "disk[0].rate_limit_group"
        await api.stop(vm_id)


async def _admitted(api: ApiClient, vm_id: str, count: int) -> None:
    with trio.fail_after(60):
        while (await api.get_vm(vm_id))["rate_limits"]["disks"][0]["admitted_ops"] < count:
            await trio.sleep(0.05)
