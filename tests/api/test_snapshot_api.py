"""POST /vms/{id}/snapshot and POST /vms {"restore": ...} through a real daemon: a real
Host with test-guest VMs behind the API, restricted with --allow-path."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from avmm.api import ApiClient, ApiError, serve_api
from avmm.host import Host
from avmm.paths import PathPolicy
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.fixture
def area() -> Iterator[Path]:
    """``allowed`` (the daemon's --allow-path, holding a copy of the test guest) and
    ``outside``, next to each other, with a short path for the socket."""
    root = Path(tempfile.mkdtemp(prefix="avmm-snap-", dir="/tmp"))
    for name in ("allowed", "outside"):
        (root / name).mkdir()
    shutil.copy(TEST_GUEST, root / "allowed" / "guest.elf")
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Daemon:
    def __init__(self, api: ApiClient, http: httpx.AsyncClient, host: Host) -> None:
        self.api = api
        self.http = http
        self.host = host

    async def post(self, url: str, body: Any, *, content_type: str = "application/json"
                   ) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(url, content=content,
                                    headers={"content-type": content_type})


@pytest.fixture
async def daemon(area: Path) -> AsyncIterator[Daemon]:
    policy = PathPolicy([area / "allowed"])
    try:
        async with Host() as host, trio.open_nursery() as nursery:
            path = await nursery.start(lambda task_status: serve_api(
                host, area / "avmm.sock", paths=policy, task_status=task_status))
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with ApiClient(path) as api, httpx.AsyncClient(
                    transport=transport, base_url="http://avmm", timeout=60) as http:
                yield Daemon(api, http, host)
            nursery.cancel_scope.cancel()
    finally:
        policy.close()


def guest(area: Path, cmdline: str, memory_mib: int = 32) -> dict[str, Any]:
    return {
        "machine": {"memory_mib": memory_mib, "acpi": False},
        "boot": {"kernel": str(area / "allowed" / "guest.elf"), "cmdline": cmdline},
        "serial": {"mode": "none"},
    }


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert "\n" not in body["error"]
    return body


async def test_snapshot_statuses(daemon: Daemon, area: Path) -> None:
    allowed, outside = area / "allowed", area / "outside"
    assert error_of(await daemon.post("/vms/vm-nope/snapshot", {"path": str(allowed / "s")}),
                    404)["error"]
    # The echo guest waits for input: it runs without burning CPU.
    vm_id = (await daemon.api.create_vm(guest(area, "avmm.test=echo")))["id"]
    url = f"/vms/{vm_id}/snapshot"
    running = error_of(await daemon.post(url, {"path": str(allowed / "s")}), 409)
    assert "pause" in running["error"]
    await daemon.api.pause(vm_id)

    bad_bodies: list[tuple[Any, str | None]] = [
        ({"path": "relative/dir"}, "path"),
        ({"path": 5}, "path"),
        ({"path": None}, "path"),
        ({"path": "/a\u0000b"}, "path"),
        ({"path": str(allowed / "s"), "resume": True}, "resume"),
        ({}, "path"),
        ([str(allowed / "s")], None),
        (b"{not json", None),
        ({"path": str(allowed / "exists")}, "path"),  # the target must be new
        ({"path": str(allowed / "missing" / "s")}, "path"),  # its parent must exist
        ({"path": str(allowed / "guest.elf" / "s")}, "path"),  # ... as a directory
    ]
    (allowed / "exists").mkdir()
    for body, key in bad_bodies:
        answer = error_of(await daemon.post(url, body), 400)
        if key is not None:
            assert answer["detail"]["key"] == key, (body, answer)
    error_of(await daemon.post(url, b"path=/x", content_type="text/plain"), 415)
    error_of(await daemon.post(url, {"path": "/" + "x" * 20_000}), 413)

    (allowed / "escape").symlink_to("../outside")
    for path in (outside / "s", allowed / "escape" / "s", f"{allowed}/../outside/s",
                 "/s"):
        answer = error_of(await daemon.post(url, {"path": str(path)}), 403)
        assert answer["detail"]["key"] == "path"
        assert "allow" in answer["error"]
    assert sorted(p.name for p in allowed.iterdir()) == ["escape", "exists", "guest.elf"]
    assert list(outside.iterdir()) == []
    # None of it touched the VM.
    assert (await daemon.api.get_vm(vm_id))["state"] == "paused"
    await daemon.api.resume(vm_id)
    await daemon.api.send_console(vm_id, b"quit\n")


async def test_restore_request_statuses(daemon: Daemon, area: Path) -> None:
    allowed, outside = area / "allowed", area / "outside"
    (allowed / "snap").mkdir()
    (outside / "snap").mkdir()
    snap = str(allowed / "snap")
    bad_bodies: list[tuple[dict[str, Any], str]] = [
        ({"restore": "snap"}, "restore"),
        ({"restore": 1}, "restore"),
        ({"restore": snap, "boot": {"kernel": str(allowed / "guest.elf")}}, "boot"),
        ({"restore": snap, "machine": {}}, "machine"),
        ({"restore": snap, "start": "false"}, "start"),
        ({"restore": snap, "copy_memory": 1}, "copy_memory"),
        ({"restore": snap, "vhost_user": ["/x.sock"]}, "vhost_user"),
        ({"restore": snap, "vhost_user": {"blk0": "x.sock"}}, "vhost_user.blk0"),
        ({"restore": snap, "vhost_user": {"../blk0": "/x.sock"}}, "vhost_user"),
        ({"restore": str(allowed / "missing")}, "restore"),
        ({"restore": str(allowed / "guest.elf")}, "restore"),
    ]
    for body, key in bad_bodies:
        answer = error_of(await daemon.post("/vms", body), 400)
        assert answer["detail"]["key"] == key, (body, answer)
    answer = error_of(await daemon.post("/vms?base_dir=/tmp", {"restore": snap}), 400)
    assert answer["detail"]["key"] == "base_dir"

    (allowed / "escape").symlink_to("../outside/snap")
    forbidden: list[tuple[dict[str, Any], str]] = [
        ({"restore": str(outside / "snap")}, "restore"),
        ({"restore": str(allowed / "escape")}, "restore"),
        ({"restore": snap, "vhost_user": {"blk0": str(outside / "b.sock")}},
         "vhost_user.blk0"),
    ]
    for body, key in forbidden:
        answer = error_of(await daemon.post("/vms", body), 403)
        assert answer["detail"]["key"] == key, (body, answer)
    assert await daemon.api.list_vms() == []


async def test_the_client_raises_api_errors(daemon: Daemon, area: Path) -> None:
    with pytest.raises(ApiError) as error:
        await daemon.api.snapshot("vm-nope", area / "allowed" / "s")
    assert error.value.status == 404
    with pytest.raises(ApiError) as error:
        await daemon.api.restore_vm(area / "outside")
    assert error.value.status == 403
