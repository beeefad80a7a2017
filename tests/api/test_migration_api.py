"""POST /vms/incoming and POST /vms/{id}/migrate over HTTP, on any machine (the fake
host): what reaches the Host from a request, the answers' shapes, the refusals (400
naming the key, 403 outside --allow-path, 404, 409), progress in GET /vms/{id} and the
avmm_migration_* metrics."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.config import config_from_dict
from avmm.paths import PathPolicy

from .fake_host import FakeHost, FakeVm

_PROGRESS_KEYS = {"state", "round", "pages_sent", "pages_dirty", "bytes_sent",
                  "downtime_ms", "total_ms"}


def _raw(api: ApiClient) -> httpx.AsyncClient:
    return api._http


async def _post(api: ApiClient, url: str, body: Any) -> httpx.Response:
    return await _raw(api).post(url, json=body)


def _error(response: httpx.Response, status: int, key: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert "\n" not in body["error"]
    if key is not None:
        assert body["detail"]["key"] == key, body
    return str(body["error"])


async def _running_vm(fake_host: FakeHost, kernel_file: Path) -> FakeVm:
    config = config_from_dict({"boot": {"kernel": str(kernel_file)},
                               "machine": {"memory_mib": 64}}, base_dir=None)
    return await fake_host.create(config)


# -- the destination --------------------------------------------------------------------


async def test_incoming_is_answered_at_once_in_state_incoming(
        api: ApiClient, fake_host: FakeHost, socket_dir: Path) -> None:
    listen = f"unix:{socket_dir}/in.sock"
    vm = await api.receive_vm(listen)
    assert vm["state"] == "incoming"
    assert vm["migration"]["state"] == "incoming"
    assert set(vm["migration"]) >= _PROGRESS_KEYS
    assert fake_host.received == [(listen, None, True)]
    # It is listed like any VM, and GET shows the same.
    assert (await api.get_vm(vm["id"]))["state"] == "incoming"
    response = await _post(api, "/vms/incoming", {"listen": "tcp:127.0.0.1:4444",
                                                  "start": False})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/vms/{response.json()['id']}"
    assert fake_host.received[-1] == ("tcp:127.0.0.1:4444", None, False)


async def test_incoming_config_is_validated_with_base_dir(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path) -> None:
    vm = await api.receive_vm("tcp:[::1]:4444", config={
        "name": "moved", "boot": {"kernel": kernel_file.name},
        "machine": {"memory_mib": 64}}, base_dir=kernel_file.parent)
    assert vm["name"] == "moved"
    _listen, config, start = fake_host.received[-1]
    assert config is not None and start
    assert config.boot.kernel == kernel_file  # resolved against base_dir
    assert config.machine.memory_mib == 64


@pytest.mark.parametrize(("body", "key"), [
    ({"listen": "unix:relative/in.sock"}, "listen"),
    ({"listen": "unix:"}, "listen"),
    ({"listen": "unix:/" + "a" * 120}, "listen"),
    ({"listen": "tcp:127.0.0.1"}, "listen"),
    ({"listen": "tcp:127.0.0.1:-1"}, "listen"),
    ({"listen": "tcp:127.0.0.1:70000"}, "listen"),
    ({"listen": "tcp::4444"}, "listen"),
    ({"listen": "tcp:bad_host!:4444"}, "listen"),
    ({"listen": "tcp:[not-v6]:4444"}, "listen"),
    ({"listen": "udp:127.0.0.1:4444"}, "listen"),
    ({"listen": 4444}, "listen"),
    ({}, "listen"),
    ({"listen": "tcp:localhost:4444", "extra": 1}, "extra"),
    ({"listen": "tcp:localhost:4444", "config": "vm.toml"}, "config"),
    ({"listen": "tcp:localhost:4444", "start": "yes"}, "start"),
    ({"listen": "tcp:localhost:4444", "accept_timeout_s": 0}, "accept_timeout_s"),
    ({"listen": "tcp:localhost:4444", "accept_timeout_s": -2.5}, "accept_timeout_s"),
    ({"listen": "tcp:localhost:4444", "accept_timeout_s": "30"}, "accept_timeout_s"),
    ({"listen": "tcp:localhost:4444", "accept_timeout_s": True}, "accept_timeout_s"),
    ({"listen": "tcp:localhost:4444", "config": {"machine": {"vcpus": "two"}}},
     "config.machine.vcpus"),
])
async def test_incoming_refuses_bad_requests_naming_the_key(
        api: ApiClient, fake_host: FakeHost, body: dict[str, Any], key: str) -> None:
    _error(await _post(api, "/vms/incoming", body), 400, key)
    assert fake_host.received == []


async def test_incoming_takes_accept_timeout_s(api: ApiClient, fake_host: FakeHost) -> None:
    await api.receive_vm("tcp:127.0.0.1:4444", accept_timeout_s=2.5)
    await _post(api, "/vms/incoming", {"listen": "tcp:127.0.0.1:4445",
                                       "accept_timeout_s": 600})
    # Left out, or null: no limit (the default).
    await api.receive_vm("tcp:127.0.0.1:4446")
    await _post(api, "/vms/incoming", {"listen": "tcp:127.0.0.1:4447",
                                       "accept_timeout_s": None})
    assert fake_host.accept_timeouts == [2.5, 600, None, None]
    # Not finite (Python's json reads 1e999 as infinity): refused.
    response = await _raw(api).post("/vms/incoming", content=b'{"listen": "tcp:a:1", '
                                    b'"accept_timeout_s": 1e999}',
                                    headers={"content-type": "application/json"})
    _error(response, 400, "accept_timeout_s")
    assert len(fake_host.received) == 4


async def test_incoming_refuses_bad_bodies(api: ApiClient, fake_host: FakeHost) -> None:
    http = _raw(api)
    response = await http.post("/vms/incoming", content=b"[1]",
                               headers={"content-type": "application/json"})
    _error(response, 400)
    response = await http.post("/vms/incoming", content=b"{",
                               headers={"content-type": "application/json"})
    _error(response, 400)
    response = await http.post("/vms/incoming", content=b'listen = "tcp:a:1"',
                               headers={"content-type": "application/toml"})
    _error(response, 415)
    response = await http.post("/vms/incoming?base_dir=rel", json={"listen": "tcp:a:1"})
    _error(response, 400, "base_dir")
    # GET is not a route for it (and "incoming" is no VM id).
    assert (await http.get("/vms/incoming")).status_code == 405
    assert fake_host.received == []


# -- the source -------------------------------------------------------------------------


async def test_migrate_is_accepted_and_its_progress_shown(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path, socket_dir: Path) -> None:
    vm = await _running_vm(fake_host, kernel_file)
    to = f"unix:{socket_dir}/dest.sock"
    response = await _post(api, f"/vms/{vm.id}/migrate", {"to": to})
    assert response.status_code == 202, response.text
    assert response.json()["migration"]["state"] == "setup"
    assert response.headers["location"] == f"/vms/{vm.id}"
    assert vm.migrations == [(to, 300)]

    vm.progress(state="precopy", round=2, pages_sent=20000, pages_dirty=150,
                bytes_sent=82_000_000, total_ms=850.0)
    shown = (await api.get_vm(vm.id))["migration"]
    assert {key: shown[key] for key in ("state", "round", "pages_sent", "pages_dirty",
                                        "bytes_sent", "total_ms")} == {
        "state": "precopy", "round": 2, "pages_sent": 20000, "pages_dirty": 150,
        "bytes_sent": 82_000_000, "total_ms": 850.0}

    vm.migrated(downtime_ms=42.0)
    after = await api.get_vm(vm.id)
    assert after["state"] == "stopped"
    assert after["exit"]["reason"] == "migrated"
    assert after["migration"]["state"] == "completed"
    assert after["migration"]["downtime_ms"] == 42.0


async def test_migrate_takes_downtime_ms(api: ApiClient, fake_host: FakeHost,
                                         kernel_file: Path) -> None:
    vm = await _running_vm(fake_host, kernel_file)
    await api.migrate(vm.id, "tcp:dest.example:4444", downtime_ms=50)
    assert vm.migrations == [("tcp:dest.example:4444", 50)]


@pytest.mark.parametrize(("body", "key"), [
    ({"to": "unix:dest.sock"}, "to"),
    ({"to": "tcp:host"}, "to"),
    ({"to": "tcp:host:99999"}, "to"),
    ({"to": "tcp:host:0"}, "to"),
    ({"to": None}, "to"),
    ({}, "to"),
    ({"to": "tcp:host:1", "downtime_ms": 0}, "downtime_ms"),
    ({"to": "tcp:host:1", "downtime_ms": 10**9}, "downtime_ms"),
    ({"to": "tcp:host:1", "downtime_ms": 1.5}, "downtime_ms"),
    ({"to": "tcp:host:1", "downtime_ms": True}, "downtime_ms"),
    ({"to": "tcp:host:1", "downtime": 300}, "downtime"),
])
async def test_migrate_refuses_bad_requests_naming_the_key(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path, body: dict[str, Any],
        key: str) -> None:
    vm = await _running_vm(fake_host, kernel_file)
    _error(await _post(api, f"/vms/{vm.id}/migrate", body), 400, key)
    assert vm.migrations == []
    assert vm.migration is None


async def test_migrate_refuses_unknown_stopped_paused_and_migrating_vms(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path) -> None:
    body = {"to": "tcp:127.0.0.1:4444"}
    _error(await _post(api, "/vms/vm-nothere/migrate", body), 404)
    vm = await _running_vm(fake_host, kernel_file)
    await vm.pause()
    _error(await _post(api, f"/vms/{vm.id}/migrate", body), 409)
    await vm.resume()
    assert (await _post(api, f"/vms/{vm.id}/migrate", body)).status_code == 202
    assert "already" in _error(await _post(api, f"/vms/{vm.id}/migrate", body), 409)
    # A failed migration leaves the VM running: it may be migrated again.
    vm.fail_migration("the destination went away")
    shown = (await api.get_vm(vm.id))["migration"]
    assert (shown["state"], shown["error"]) == ("failed", "the destination went away")
    assert (await _post(api, f"/vms/{vm.id}/migrate", body)).status_code == 202
    vm.migrated()
    _error(await _post(api, f"/vms/{vm.id}/migrate", body), 409)
    assert len(vm.migrations) == 2
    response = await _raw(api).post(f"/vms/{vm.id}/migrate", content=b"to=x",
                                    headers={"content-type": "text/plain"})
    _error(response, 415)


# -- --allow-path ---------------------------------------------------------------------------


@pytest.fixture
def area() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="avmm-mig-", dir="/tmp"))
    for name in ("allowed", "outside"):
        (root / name).mkdir()
    (root / "allowed" / "vmlinux").write_bytes(b"\x7fELF fake")
    (root / "outside" / "vmlinux").write_bytes(b"\x7fELF fake")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def restricted(nursery: trio.Nursery, area: Path, fake_host: FakeHost
                     ) -> AsyncIterator[ApiClient]:
    policy = PathPolicy([area / "allowed"])
    try:
        path = await nursery.start(lambda task_status: serve_api(
            fake_host, area / "avmm.sock", paths=policy, task_status=task_status))
        async with ApiClient(path) as client:
            yield client
    finally:
        policy.close()


async def test_unix_paths_and_config_paths_outside_allow_path_are_403(
        restricted: ApiClient, fake_host: FakeHost, area: Path) -> None:
    inside, outside = area / "allowed", area / "outside"
    _error(await _post(restricted, "/vms/incoming", {"listen": f"unix:{outside}/in.sock"}),
           403, "listen")
    _error(await _post(restricted, "/vms/incoming", {
        "listen": f"unix:{inside}/in.sock",
        "config": {"boot": {"kernel": str(outside / "vmlinux")}}}), 403)
    # A symlink inside that leads out is outside too.
    (inside / "link").symlink_to(outside)
    _error(await _post(restricted, "/vms/incoming", {"listen": f"unix:{inside}/link/s"}),
           403, "listen")
    assert fake_host.received == []
    vm = await restricted.receive_vm(f"unix:{inside}/in.sock", config={
        "boot": {"kernel": str(inside / "vmlinux")}})
    assert vm["state"] == "incoming"

    config = config_from_dict({"boot": {"kernel": str(inside / "vmlinux")}}, base_dir=None)
    source = await fake_host.create(config)
    _error(await _post(restricted, f"/vms/{source.id}/migrate",
                       {"to": f"unix:{outside}/dest.sock"}), 403, "to")
    assert source.migrations == []
    # TCP addresses are not paths: no --allow-path check applies.
    await restricted.migrate(source.id, "tcp:127.0.0.1:4444")
    assert source.migrations == [("tcp:127.0.0.1:4444", 300)]


# -- metrics ----------------------------------------------------------------------------------


async def test_migration_metrics(api: ApiClient, fake_host: FakeHost,
                                 kernel_file: Path) -> None:
    quiet = await _running_vm(fake_host, kernel_file)
    vm = await _running_vm(fake_host, kernel_file)
    await api.migrate(vm.id, "tcp:127.0.0.1:4444")
    vm.progress(state="precopy", round=3, pages_sent=1000, pages_dirty=10,
                bytes_sent=4_100_000, total_ms=1500.0)
    text = await api.metrics()
    assert f'avmm_migration_state{{vm="{vm.id}",state="precopy"}} 1\n' in text
    assert f'avmm_migration_state{{vm="{vm.id}",state="setup"}} 0\n' in text
    assert f'avmm_migration_round{{vm="{vm.id}"}} 3\n' in text
    assert f'avmm_migration_pages_sent{{vm="{vm.id}"}} 1000\n' in text
    assert f'avmm_migration_pages_dirty{{vm="{vm.id}"}} 10\n' in text
    assert f'avmm_migration_sent_bytes{{vm="{vm.id}"}} 4100000\n' in text
    assert f'avmm_migration_duration_seconds{{vm="{vm.id}"}} 1.5\n' in text
    assert "# TYPE avmm_migration_downtime_seconds gauge" in text
    assert f'avmm_migration_downtime_seconds{{vm="{vm.id}"}}' not in text  # not yet known
    assert f'vm="{quiet.id}",state="precopy"' not in text  # never migrated
    vm.migrated(downtime_ms=25.0)
    text = await api.metrics()
    assert f'avmm_migration_downtime_seconds{{vm="{vm.id}"}} 0.025\n' in text
    assert f'avmm_migration_state{{vm="{vm.id}",state="completed"}} 1\n' in text
