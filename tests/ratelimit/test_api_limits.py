"""PATCH /vms/{id} over the real HTTP stack with a fake Host, and `avmm update` against it:
status codes, keys named in errors, the body the CLI builds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from avmm.api import ApiClient
from avmm.api.cli_limits import build_changes
from avmm.cli import main
from avmm.ratelimit import BucketConfig, RateLimitConfig
from tests.api.fake_host import FakeHost


def _config(kernel: Path) -> dict[str, Any]:
    return {"boot": {"kernel": str(kernel)}, "serial": {"mode": "none"},
            "disk": [{"path": str(kernel)}], "net": [{"tap": "avmmrl0"}]}


async def _patch(api: ApiClient, vm_id: str, body: Any) -> httpx.Response:
    return await api._http.patch(f"/vms/{vm_id}", json=body)


async def test_patch_validates_the_whole_body_then_applies_it(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    body = {"disks": [{"index": 0, "rate_limit": {"ops": {"size": 500, "refill_ms": 1000}}}],
            "nets": [{"index": 0, "tx_rate_limit": None,
                      "rx_rate_limit": {"bandwidth": {"size": 1 << 20, "refill_ms": 100,
                                                      "one_time_burst": 4096}}}]}
    response = await _patch(api, vm_id, body)
    assert response.status_code == 200
    assert response.json()["id"] == vm_id
    (update,) = fake_host.vms[vm_id].limit_updates
    assert [(c.kind, c.index, c.direction, c.limit) for c in update.changes] == [
        ("disk", 0, None, RateLimitConfig(ops=BucketConfig(size=500, refill_ms=1000))),
        ("net", 0, "tx", None),
        ("net", 0, "rx", RateLimitConfig(bandwidth=BucketConfig(
            size=1 << 20, refill_ms=100, one_time_burst=4096)))]


@pytest.mark.parametrize(("body", "status", "key"), [
    ({"disks": [{"index": 0, "rate_limit": {"ops": {"size": 0, "refill_ms": 1}}}]},
     400, "disks[0].rate_limit.ops.size"),
    ({"disks": [{"index": 0, "rate_limit": {"ops": {"size": 5}}}]},
     400, "disks[0].rate_limit.ops.refill_ms"),
    ({"disks": [{"index": 0, "rate_limit": {"iops": {"size": 5, "refill_ms": 1}}}]},
     400, "disks[0].rate_limit.iops"),
    ({"disks": [{"index": -1, "rate_limit": None}]}, 400, "disks[0].index"),
    ({"disks": [{"rate_limit": None}]}, 400, "disks[0].index"),
    ({"disks": [{"index": 0, "rate_limt": None}]}, 400, "disks[0].rate_limt"),
    ({"nets": [{"index": 0, "rate_limit": None}]}, 400, "nets[0].rate_limit"),
    ({"nets": "all"}, 400, "nets"),
    ({"disk": []}, 400, "disk"),
    ({"machine": {"cpu_weight": 0}}, 400, "machine.cpu_weight"),
    ({"machine": {"cpu_max_percent": -5}}, 400, "machine.cpu_max_percent"),
    ({"machine": {"cpu_affinity": [0]}}, 400, "machine.cpu_affinity"),
    ({"machine": []}, 400, "machine"),
    ({"disks": [{"index": 3, "rate_limit": None}]}, 404, "disks[0].rate_limit"),
    ({"rate_limit_groups": {"g": {"ops": {"size": 1, "refill_ms": 1}}}}, 404,
     "rate_limit_groups.g"),
    ({"rate_limit_groups": {"g": {}}}, 400, "rate_limit_groups.g"),
])
async def test_bad_patches_name_the_key(api: ApiClient, fake_host: FakeHost, kernel_file: Path,
                                        body: Any, status: int, key: str) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    response = await _patch(api, vm_id, body)
    assert response.status_code == status, response.json()
    assert response.json()["detail"]["key"] == key
    assert fake_host.vms[vm_id].limit_updates == []


async def test_machine_limits_are_checked_and_passed_on(api: ApiClient, fake_host: FakeHost,
                                                       kernel_file: Path) -> None:
    """A good ``machine`` object is accepted (the real VM's CPU limits change: see
    tests/cgroups/test_vm_cpu.py::test_patch_changes_the_cpu_limits_of_a_running_vm)."""
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    response = await _patch(api, vm_id, {"machine": {"cpu_weight": 200,
                                                     "cpu_max_percent": None}})
    assert response.status_code == 200, response.json()
    (update,) = fake_host.vms[vm_id].limit_updates
    assert update.machine == {"cpu_weight": 200, "cpu_max_percent": None}


async def test_patch_errors_of_the_request_itself(api: ApiClient, kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    http = api._http
    assert (await http.patch("/vms/vm-nope", json={})).status_code == 404
    assert (await http.patch(f"/vms/{vm_id}", content=b"{}")).status_code == 415
    response = await http.patch(f"/vms/{vm_id}", content=b"[1]",
                                headers={"content-type": "application/json"})
    assert response.status_code == 400


def _args(**flags: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    from avmm.api.cli_limits import add_update_command

    commands = parser.add_subparsers()
    add_update_command(commands, lambda command: command)
    argv = ["update", "vm-1"]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def test_the_cli_merges_a_new_bucket_with_the_devices_current_limit() -> None:
    vm = {"rate_limits": {"disks": [{"index": 0, "rate_limit": {
        "bandwidth": {"size": 100, "refill_ms": 10}}}], "nets": []}}
    changes = build_changes(_args(disk0_iops=500, disk0_iops_burst=50, disk1_bandwidth="8M",
                                  net0_rx_pps=0, net2_tx_bandwidth="1K"), vm)
    assert changes == {
        "disks": [{"index": 0, "rate_limit": {
                      "bandwidth": {"size": 100, "refill_ms": 10},
                      "ops": {"size": 500, "refill_ms": 1000, "one_time_burst": 50}}},
                  {"index": 1, "rate_limit": {"bandwidth": {"size": 8 << 20,
                                                            "refill_ms": 1000}}}],
        "nets": [{"index": 0, "rx_rate_limit": None},
                 {"index": 2, "tx_rate_limit": {"bandwidth": {"size": 1024,
                                                              "refill_ms": 1000}}}]}
    assert build_changes(_args(disk0_unlimited=True, net0_unlimited=True), vm) == {
        "disks": [{"index": 0, "rate_limit": None}],
        "nets": [{"index": 0, "tx_rate_limit": None, "rx_rate_limit": None}]}


def test_the_cli_sends_cpu_limits_in_machine() -> None:
    assert build_changes(_args(cpu_weight=300, cpu_max_percent="150.5"), {}) == {
        "machine": {"cpu_weight": 300, "cpu_max_percent": 150.5}}
    assert build_changes(_args(cpu_max_percent="none"), {}) == {
        "machine": {"cpu_max_percent": None}}
    with pytest.raises(SystemExit):
        _args(cpu_max_percent="half")


async def test_avmm_update_sends_the_patch_and_exits_by_the_answer(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path, socket_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    socket = str(socket_dir / "avmm.sock")

    async def run(*argv: str) -> int:
        return await trio.to_thread.run_sync(main, ["update", vm_id, *argv, "--socket",
                                                    socket])

    assert await run("--disk0-iops", "500") == 0
    (update,) = fake_host.vms[vm_id].limit_updates
    assert update.changes[0].limit == RateLimitConfig(ops=BucketConfig(size=500,
                                                                       refill_ms=1000))
    assert await run("--disk3-iops", "5") == 1  # no such disk: the daemon's 404
    assert "disks[0].rate_limit" in capsys.readouterr().err
    assert await run("--cpu-weight", "0") == 2  # the daemon's 400 names the key
    assert "machine.cpu_weight" in capsys.readouterr().err
    assert await run("--disk3-iops", "5") == 1
    assert "disks[0].rate_limit" in capsys.readouterr().err
    assert await run() == 2
    assert "nothing to change" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        await run("--disk0-bandwidth", "lots")
    assert caught.value.code == 2
    assert "--disk0-bandwidth" in capsys.readouterr().err


async def test_daemon_groups_are_created_changed_listed_and_removed(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path) -> None:
    http = api._http
    ops = {"ops": {"size": 100, "refill_ms": 1000}}
    response = await http.put("/rate_limit_groups/tenant-a", json=ops)
    assert response.status_code == 201
    assert response.headers["location"] == "/rate_limit_groups/tenant-a"
    assert response.json() == {"name": "tenant-a", "rate_limit": ops, "tokens": {"ops": 100}}
    limiter = fake_host.rate_limit_groups.get("tenant-a")
    both = {"ops": {"size": 10, "refill_ms": 1000},
            "bandwidth": {"size": 4096, "refill_ms": 10, "one_time_burst": 1}}
    response = await http.put("/rate_limit_groups/tenant-a", json=both)
    assert response.status_code == 200
    # Changed in place: the VMs that share it see the change.
    assert fake_host.rate_limit_groups.get("tenant-a") is limiter
    assert limiter is not None and limiter.config.to_dict() == both
    assert (await http.get("/rate_limit_groups")).json() == {"rate_limit_groups": [
        {"name": "tenant-a", "rate_limit": both, "tokens": {"bandwidth": 4096, "ops": 10}}]}
    # A VM config may name it without defining it.
    config = {**_config(kernel_file), "disk": [{"path": str(kernel_file),
                                                "rate_limit_group": "tenant-a"}]}
    assert (await http.post("/vms", json=config)).status_code == 201
    config["disk"][0]["rate_limit_group"] = "tenant-b"
    response = await http.post("/vms", json=config)
    assert response.status_code == 400
    assert response.json()["detail"]["key"] == "disk[0].rate_limit_group"
    assert "PUT /rate_limit_groups/tenant-b" in response.json()["error"]
    assert (await http.delete("/rate_limit_groups/tenant-a")).status_code == 204
    assert (await http.delete("/rate_limit_groups/tenant-a")).status_code == 204
    refused = await http.delete("/rate_limit_groups/no.such.name")  # not a group name
    assert refused.status_code == 400 and refused.json()["detail"]["key"] == "name"
    assert (await http.get("/rate_limit_groups/tenant-a")).status_code == 404


@pytest.mark.parametrize(("name", "body", "key"), [
    ("a b", {"ops": {"size": 1, "refill_ms": 1}}, "name"),
    ("g", {}, "bandwidth"),
    ("g", {"ops": {"size": 1, "refill_ms": 0}}, "ops.refill_ms"),
    ("g", {"op": {"size": 1, "refill_ms": 1}}, "op"),
    ("g", [1], None),
])
async def test_bad_groups_are_400_naming_the_key(api: ApiClient, name: str, body: Any,
                                                 key: str | None) -> None:
    response = await api._http.put(f"/rate_limit_groups/{name}", json=body)
    assert response.status_code == 400, response.json()
    assert (response.json()["detail"] or {}).get("key") == key


def test_a_patch_with_machine_keeps_its_body_for_a_vm_in_a_worker() -> None:
    """A VM in a worker process gets the body as sent (WorkerVm.update_limits passes
    everything but machine on): with machine in it too, the rate limits must not be
    dropped."""
    from avmm.api._limits import parse_limits_update

    body = {"machine": {"cpu_weight": 200},
            "disks": [{"index": 0, "rate_limit": {"ops": {"size": 5, "refill_ms": 100}}}]}
    update = parse_limits_update(body)
    assert update.machine == {"cpu_weight": 200}
    assert update.source == body and len(update.changes) == 1
