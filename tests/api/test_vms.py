"""Real VMs (the test guest) hosted by a real Host behind the API, in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from avmm.api import ApiClient, ApiError, serve_api
from avmm.host import Host
from tests.vm.helpers import TEST_GUEST, tiny_elf

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

#: Iterations of the count guest: about half a second of guest time alone, so a pause
#: right after a resume lands in the middle of the count.
N = 1_000_000_000
VMS = 20


def guest(cmdline: str, *, kernel: Path = TEST_GUEST, name: str | None = None
          ) -> dict[str, Any]:
    config: dict[str, Any] = {
        "machine": {"memory_mib": 32, "acpi": False},
        "boot": {"kernel": str(kernel), "cmdline": cmdline},
        "serial": {"mode": "none"},
    }
    if name is not None:
        config["name"] = name
    return config


@pytest.fixture
async def vm_api(socket_dir: Path) -> AsyncIterator[ApiClient]:
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, socket_dir / "avmm.sock")
        async with ApiClient(path) as client:
            yield client
        nursery.cancel_scope.cancel()


async def read_until_stopped(api: ApiClient, vm_id: str) -> str:
    """The whole serial output: the console stream ends when the VM has stopped."""
    output = bytearray()
    with trio.fail_after(300):
        async with api.console(vm_id) as chunks:
            async for chunk in chunks:
                output += chunk
    return output.decode(errors="replace")


async def test_twenty_vms_paused_resumed_and_deleted_concurrently(vm_api: ApiClient) -> None:
    mid_run_pauses = 0

    async def one(index: int) -> None:
        nonlocal mid_run_pauses
        vm = await vm_api.create_vm(guest(f"avmm.test=count avmm.n={N}", name=f"count-{index}"),
                                    start=False)
        vm_id = vm["id"]
        assert vm["state"] == "paused"  # built, not one instruction run yet
        output = bytearray()
        with trio.fail_after(300):
            async with vm_api.console(vm_id) as chunks:
                assert (await vm_api.resume(vm_id))["state"] == "running"
                try:
                    assert (await vm_api.pause(vm_id))["state"] == "paused"
                except ApiError as e:
                    # Only possible if the whole count ran between two requests.
                    assert e.status == 409
                    assert (await vm_api.get_vm(vm_id))["state"] in ("stopping", "stopped")
                else:
                    mid_run_pauses += 1
                    assert (await vm_api.resume(vm_id))["state"] == "running"
                async for chunk in chunks:
                    output += chunk
        assert f"avmm-testguest: count done n={N}" in output.decode()
        finished = await vm_api.get_vm(vm_id)
        assert finished["state"] == "stopped"
        assert finished["exit"]["reason"] == "reset"
        assert finished["exit"]["exit_status"] == 0
        await vm_api.delete_vm(vm_id)

    async with trio.open_nursery() as nursery:
        for index in range(VMS):
            nursery.start_soon(one, index)
    assert await vm_api.list_vms() == []
    assert mid_run_pauses > 0


async def test_triple_fault_is_reported_while_neighbours_keep_running(
        vm_api: ApiClient, tmp_path: Path) -> None:
    # ud2 with the boot IDT's limit of 0: #UD cannot be delivered → #DF → triple fault.
    kernel = tiny_elf(tmp_path / "ud2.elf", b"\x0f\x0b")
    neighbours = [(await vm_api.create_vm(guest("avmm.test=echo")))["id"] for _ in range(2)]
    faulty = (await vm_api.create_vm(guest("", kernel=kernel, name="faulty")))["id"]
    await read_until_stopped(vm_api, faulty)
    vm = await vm_api.get_vm(faulty)
    assert vm["state"] == "stopped"
    assert vm["exit"]["reason"] == "triple-fault"
    assert vm["exit"]["exit_status"] == 4
    assert "rip=0x100000" in vm["exit"]["detail"]
    for vm_id in neighbours:
        assert (await vm_api.get_vm(vm_id))["state"] == "running"
        await vm_api.send_console(vm_id, b"still here\nquit\n")
        assert "avmm-testguest: echo still here" in await read_until_stopped(vm_api, vm_id)
        assert (await vm_api.get_vm(vm_id))["exit"]["reason"] == "reset"


async def test_console_input_output_and_metrics_of_a_real_guest(vm_api: ApiClient) -> None:
    vm_id = (await vm_api.create_vm(guest("avmm.test=echo")))["id"]
    with trio.fail_after(120):
        async with vm_api.console(vm_id) as chunks:
            seen = bytearray()
            async for chunk in chunks:
                seen += chunk
                if b"echo ready" in seen:
                    break
    # Detached: the VM runs on, and a new viewer gets the backlog first.
    await vm_api.send_console(vm_id, b"hello api\n")
    await vm_api.send_console(vm_id, b"quit\n")
    output = await read_until_stopped(vm_api, vm_id)
    assert output.startswith("avmm-testguest: ")
    assert "avmm-testguest: echo ready" in output
    assert "avmm-testguest: echo hello api" in output
    assert "avmm-testguest: echo bye" in output
    families = {family.name: family for family in
                text_string_to_metric_families(await vm_api.metrics())}
    exits = {sample.labels["reason"]: sample.value
             for sample in families["avmm_vcpu_exits"].samples
             if sample.labels["vm"] == vm_id}
    assert sum(exits.values()) > 0
    states = {sample.labels["state"]: sample.value for sample in families["avmm_vm_state"].samples
              if sample.labels["vm"] == vm_id}
    assert states["stopped"] == 1
    assert sum(states.values()) == 1
    with pytest.raises(ApiError) as error:
        await vm_api.send_console(vm_id, b"too late\n")
    assert error.value.status == 409


async def test_config_that_cannot_boot_is_422(vm_api: ApiClient, tmp_path: Path) -> None:
    not_a_kernel = tmp_path / "notes.txt"
    not_a_kernel.write_text("not a kernel\n")
    with pytest.raises(ApiError) as error:
        await vm_api.create_vm(guest("", kernel=not_a_kernel))
    assert error.value.status == 422
    assert error.value.detail["step"]
    assert await vm_api.list_vms() == []
