"""Every endpoint of the management API, errors included, over a real unix socket with
hypercorn in front and a fake Host behind (no KVM needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from avmm.api import ApiClient, ApiError

from .fake_host import FakeHost


def _config(kernel: Path, **extra: Any) -> dict[str, Any]:
    return {"boot": {"kernel": str(kernel), "cmdline": "avmm.test=hello"},
            "machine": {"memory_mib": 32, "acpi": False}, "serial": {"mode": "none"}, **extra}


def _raw(api: ApiClient) -> httpx.AsyncClient:
    """The client's own httpx client, for requests the typed client never makes."""
    return api._http


async def test_openapi_document_is_served(api: ApiClient) -> None:
    document = await api.openapi()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/openapi.json", "/vms", "/vms/{id}", "/vms/{id}/pause", "/vms/{id}/resume",
        "/vms/{id}/stop", "/vms/{id}/console", "/vms/{id}/snapshot", "/vms/{id}/migrate",
        "/vms/incoming", "/metrics", "/rate_limit_groups", "/rate_limit_groups/{name}"}


async def test_create_json_returns_201_with_id_and_location(api: ApiClient,
                                                            kernel_file: Path) -> None:
    response = await _raw(api).post("/vms", json=_config(kernel_file, name="web-1"))
    assert response.status_code == 201
    vm = response.json()
    assert vm["id"].startswith("vm-")
    assert vm["name"] == "web-1"
    assert vm["state"] == "running"
    assert response.headers["location"] == f"/vms/{vm['id']}"


async def test_create_toml_goes_through_the_same_validation(api: ApiClient,
                                                            kernel_file: Path) -> None:
    toml = f'name = "from-toml"\n[boot]\nkernel = "{kernel_file}"\n'
    vm = await api.create_vm(toml=toml)
    assert vm["name"] == "from-toml"
    with pytest.raises(ApiError) as error:
        await api.create_vm(toml=f'[boot]\nkernel = "{kernel_file}"\n[machine]\nvcpus = 0\n')
    assert error.value.status == 400
    assert error.value.detail["key"] == "machine.vcpus"


async def test_bad_config_is_400_naming_the_key(api: ApiClient, kernel_file: Path) -> None:
    for config, key in [
        (_config(kernel_file, machine={"memroy_mib": 64}), "machine.memroy_mib"),
        (_config(kernel_file, machine={"vcpus": "two"}), "machine.vcpus"),
        ({"machine": {}}, "boot"),
        (_config(kernel_file.parent / "missing"), "boot.kernel"),
        (_config(kernel_file, disk=[{"path": "disk.img"}]), "disk[0].path"),
    ]:
        with pytest.raises(ApiError) as error:
            await api.create_vm(config)
        assert error.value.status == 400, config
        assert error.value.detail["key"] == key
        assert key.split("[")[0].split(".")[-1] in error.value.message


async def test_relative_paths_need_base_dir(api: ApiClient, kernel_file: Path) -> None:
    relative = _config(Path(kernel_file.name))
    with pytest.raises(ApiError) as error:
        await api.create_vm(relative)
    assert error.value.status == 400
    assert error.value.detail["key"] == "boot.kernel"
    assert "absolute" in error.value.message
    vm = await api.create_vm(relative, base_dir=kernel_file.parent)
    assert vm["config"]["boot"]["kernel"] == str(kernel_file)
    with pytest.raises(ApiError) as error:
        await api.create_vm(relative, base_dir="relative/dir")
    assert (error.value.status, error.value.detail["key"]) == (400, "base_dir")


async def test_serial_console_means_the_api_console(api: ApiClient, kernel_file: Path,
                                                    fake_host: FakeHost) -> None:
    config = _config(kernel_file)
    del config["serial"]  # the default, mode = "console": the daemon has no terminal
    vm = await api.create_vm(config)
    assert fake_host.vms[vm["id"]].config.serial.mode == "none"
    with pytest.raises(ApiError) as error:
        await api.create_vm(_config(kernel_file, console={"mode": "console"}))
    assert (error.value.status, error.value.detail["key"]) == (400, "console.mode")


async def test_malformed_bodies_are_400(api: ApiClient) -> None:
    http = _raw(api)
    for body, content_type in [(b"{", "application/json"), (b"[1, 2]", "application/json"),
                               (b"\xff\xfe", "application/json"),
                               (b"[boot\nkernel=", "application/toml")]:
        response = await http.post("/vms", content=body, headers={"content-type": content_type})
        assert response.status_code == 400, body
        assert set(response.json()) == {"error", "detail"}


async def test_unsupported_content_type_is_415(api: ApiClient) -> None:
    response = await _raw(api).post("/vms", content=b"name: x",
                                    headers={"content-type": "application/yaml"})
    assert response.status_code == 415
    assert "application/toml" in response.json()["error"]


async def test_oversized_body_is_413(api: ApiClient) -> None:
    response = await _raw(api).post("/vms", content=b" " * (2 << 20),
                                    headers={"content-type": "application/json"})
    assert response.status_code == 413


async def test_vm_that_cannot_start_is_422_naming_the_step(api: ApiClient,
                                                           kernel_file: Path) -> None:
    with pytest.raises(ApiError) as error:
        await api.create_vm(_config(kernel_file, name="unbootable"))
    assert error.value.status == 422
    assert error.value.detail["step"] == "load the kernel"


async def test_list_and_get(api: ApiClient, kernel_file: Path) -> None:
    assert await api.list_vms() == []
    first = await api.create_vm(_config(kernel_file, name="a"))
    second = await api.create_vm(_config(kernel_file, name="b"))
    assert [vm["id"] for vm in await api.list_vms()] == [first["id"], second["id"]]
    vm = await api.get_vm(second["id"])
    assert vm["name"] == "b"
    assert vm["exit"] is None
    assert vm["uptime_s"] == 1.5


async def test_unknown_vm_is_404_everywhere(api: ApiClient) -> None:
    http = _raw(api)
    for method, url in [("GET", "/vms/vm-nope"), ("POST", "/vms/vm-nope/pause"),
                        ("POST", "/vms/vm-nope/resume"), ("POST", "/vms/vm-nope/stop"),
                        ("GET", "/vms/vm-nope/console"), ("POST", "/vms/vm-nope/console")]:
        response = await http.request(method, url, content=b"x")
        assert response.status_code == 404, (method, url)
        assert "vm-nope" in response.json()["error"]


async def test_delete_is_idempotent(api: ApiClient, kernel_file: Path,
                                    fake_host: FakeHost) -> None:
    vm = await api.create_vm(_config(kernel_file))
    for _ in range(2):
        response = await _raw(api).delete(f"/vms/{vm['id']}")
        assert response.status_code == 204
    assert fake_host.vms == {}
    with pytest.raises(ApiError) as error:
        await api.get_vm(vm["id"])
    assert error.value.status == 404


async def test_pause_resume_stop_and_wrong_states_are_409(api: ApiClient,
                                                          kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    with pytest.raises(ApiError) as error:
        await api.resume(vm_id)
    assert error.value.status == 409
    assert (await api.pause(vm_id))["state"] == "paused"
    with pytest.raises(ApiError) as error:
        await api.pause(vm_id)
    assert error.value.status == 409
    assert (await api.resume(vm_id))["state"] == "running"
    stopped = await api.stop(vm_id)
    assert stopped["state"] == "stopped"
    assert stopped["exit"] == {"reason": "stopped", "exit_status": 0,
                               "detail": "stopped by the host"}
    assert (await api.stop(vm_id))["state"] == "stopped"  # idempotent
    with pytest.raises(ApiError) as error:
        await api.pause(vm_id)
    assert error.value.status == 409


async def test_create_paused_with_start_false(api: ApiClient, kernel_file: Path) -> None:
    vm = await api.create_vm(_config(kernel_file), start=False)
    assert vm["state"] == "paused"
    assert (await api.resume(vm["id"]))["state"] == "running"
    response = await _raw(api).post("/vms?start=maybe", json=_config(kernel_file))
    assert (response.status_code, response.json()["detail"]) == (400, {"key": "start"})


async def test_crashed_vm_is_reported_with_its_reason(api: ApiClient, kernel_file: Path,
                                                      fake_host: FakeHost) -> None:
    crashed = await api.create_vm(_config(kernel_file))
    neighbour = await api.create_vm(_config(kernel_file))
    fake_host.vms[crashed["id"]].crash()
    vm = await api.get_vm(crashed["id"])
    assert vm["state"] == "stopped"
    assert vm["exit"]["reason"] == "triple-fault"
    assert (await api.get_vm(neighbour["id"]))["state"] == "running"


async def test_console_streams_backlog_then_output_and_takes_input(
        api: ApiClient, kernel_file: Path, fake_host: FakeHost) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    async with api.console(vm_id) as output:
        assert await output.__anext__() == b"fake-guest: hello\n"
        fake_host.vms[vm_id].emit(b"more output\n")
        assert await output.__anext__() == b"more output\n"
        await api.send_console(vm_id, b"typed\n")
        assert await output.__anext__() == b"typed\n"
    assert fake_host.vms[vm_id].received == b"typed\n"
    # Detaching left the VM running, and the viewer's subscription is gone.
    with trio.fail_after(5):
        while fake_host.vms[vm_id].subscribers:
            await trio.sleep(0.01)
    assert (await api.get_vm(vm_id))["state"] == "running"


async def test_console_stream_ends_when_the_vm_stops(api: ApiClient, kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    chunks = []
    async with api.console(vm_id) as output, trio.open_nursery() as nursery:
        nursery.start_soon(api.stop, vm_id)
        async for chunk in output:
            chunks.append(chunk)
    assert b"".join(chunks) == b"fake-guest: hello\n"
    with pytest.raises(ApiError) as error:
        await api.send_console(vm_id, b"late")
    assert error.value.status == 409


async def test_console_input_limit_is_413(api: ApiClient, kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file)))["id"]
    response = await _raw(api).post(f"/vms/{vm_id}/console", content=bytes(65 << 10))
    assert response.status_code == 413


async def test_metrics_in_prometheus_text_format(api: ApiClient, kernel_file: Path) -> None:
    vm_id = (await api.create_vm(_config(kernel_file, name="web.1")))["id"]
    response = await _raw(api).get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(response.text)
               for sample in family.samples}
    assert samples[("avmm_vm_info", (("name", "web.1"), ("vm", vm_id)))] == 1
    assert samples[("avmm_vm_state", (("state", "running"), ("vm", vm_id)))] == 1
    assert samples[("avmm_vm_state", (("state", "paused"), ("vm", vm_id)))] == 0
    assert samples[("avmm_vcpu_exits_total", (("reason", "io"), ("vm", vm_id)))] == 10
    device = (("device", "blk0"), ("kind", "blk"), ("vm", vm_id))
    assert samples[("avmm_virtio_requests_total", device)] == 4
    assert samples[("avmm_virtio_bytes_total", device)] == 2048
    assert samples[("avmm_virtio_notifications_total", device)] == 5
    assert samples[("avmm_vm_uptime_seconds", (("vm", vm_id),))] == 1.5


async def test_wrong_method_is_405_with_allow(api: ApiClient) -> None:
    response = await _raw(api).put("/vms", content=b"{}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["detail"] == {"allow": ["GET", "POST"]}
    response = await _raw(api).get("/vms/x/pause")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


async def test_unknown_route_is_404_json(api: ApiClient) -> None:
    response = await _raw(api).get("/nothing/here")
    assert response.status_code == 404
    assert "openapi.json" in response.json()["error"]


async def test_creating_while_draining_is_503(nursery: trio.Nursery, socket_dir: Path,
                                              kernel_file: Path) -> None:
    from avmm.api import serve_api

    draining = trio.Event()
    draining.set()
    path = await nursery.start(lambda task_status: serve_api(
        FakeHost(), socket_dir / "d.sock", draining=draining, task_status=task_status))
    async with ApiClient(path) as api:
        with pytest.raises(ApiError) as error:
            await api.create_vm(_config(kernel_file))
    assert error.value.status == 503


async def test_host_bug_is_500_json_not_a_dropped_connection(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(fake_host, "list", broken)
    response = await _raw(api).get("/vms")
    assert response.status_code == 500
    assert json.loads(response.text)["detail"] == {"type": "RuntimeError"}


async def test_requests_are_served_on_trio(api: ApiClient, fake_host: FakeHost,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sniffio

    libraries = []
    real_list = fake_host.list

    def recording_list() -> list[Any]:
        libraries.append(sniffio.current_async_library())
        return real_list()

    monkeypatch.setattr(fake_host, "list", recording_list)
    await api.list_vms()
    assert libraries == ["trio"]
