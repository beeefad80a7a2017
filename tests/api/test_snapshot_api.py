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


# -- snapshot and restore of a running guest through the API ---------------------------------

#: mem-walk: small (the guest checks all of it every round), with rounds enough that a
#: pause sent over HTTP after round 2 lands long before the end.
MEM_WALK_ROUNDS = 150
MEM_WALK = f"avmm.test=mem-walk avmm.mib=4 avmm.rounds={MEM_WALK_ROUNDS}"
PREFIX = "avmm-testguest: mem-walk "


def rounds_printed(output: str) -> list[int]:
    return [int(line.split("round=")[1].split()[0]) for line in output.splitlines()
            if line.startswith(PREFIX + "round=") and " crc=" in line]


async def output_of(api: ApiClient, vm_id: str, until: str | None = None) -> str:
    """The VM's serial output: up to ``until``, or (None) until the VM stops."""
    output = bytearray()
    with trio.fail_after(300):
        async with api.console(vm_id) as chunks:
            async for chunk in chunks:
                output += chunk
                if until is not None and until.encode() in output:
                    break
    return output.decode()


async def output_for(api: ApiClient, vm_id: str, seconds: float) -> str:
    """What the VM prints within ``seconds``."""
    output = bytearray()
    async with api.console(vm_id) as chunks:
        with trio.move_on_after(seconds):
            async for chunk in chunks:
                output += chunk
    return output.decode()


async def test_snapshot_over_rest_and_restore_runs_to_the_end(daemon: Daemon, area: Path
                                                             ) -> None:
    allowed = area / "allowed"
    api = daemon.api
    vm_id = (await api.create_vm(guest(area, MEM_WALK)))["id"]
    await output_of(api, vm_id, until=PREFIX + "round=2 crc=")
    await api.pause(vm_id)
    snap = allowed / "snap"
    response = await daemon.post(f"/vms/{vm_id}/snapshot", {"path": str(snap)})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["path"] == str(snap)
    assert info["bytes_state"] == (snap / "state.avmm").stat().st_size
    assert 4 << 20 <= info["bytes_memory"] <= 32 << 20
    assert info["duration_ms"] > 0
    assert (await api.get_vm(vm_id))["state"] == "paused"  # it stays paused
    again = error_of(await daemon.post(f"/vms/{vm_id}/snapshot", {"path": str(snap)}), 400)
    assert "already exists" in again["error"]
    await api.stop(vm_id)
    before = await output_of(api, vm_id)  # the backlog, up to the snapshot
    assert PREFIX + "done" not in before, "the walk ended before the pause: nothing to test"
    await api.delete_vm(vm_id)

    # A damaged copy: one line, 400, and no VM left behind.
    broken = allowed / "broken"
    shutil.copytree(snap, broken)
    with (broken / "state.avmm").open("r+b") as f:
        f.truncate((broken / "state.avmm").stat().st_size // 2)
    answer = error_of(await daemon.post("/vms", {"restore": str(broken)}), 400)
    assert "state.avmm" in answer["error"] and str(broken) in answer["error"]
    not_a_snapshot = error_of(await daemon.post("/vms", {"restore": str(allowed)}), 400)
    assert str(allowed) in not_a_snapshot["error"]
    assert await api.list_vms() == []

    # Restored paused: nothing runs until resume; then it goes on from the saved round.
    restored = await api.restore_vm(snap, start=False)
    assert restored["state"] == "paused"
    assert restored["config"]["boot"]["cmdline"].startswith(MEM_WALK)
    assert rounds_printed(await output_for(api, restored["id"], 0.5)) == []
    await api.resume(restored["id"])
    after = await output_of(api, restored["id"])
    assert PREFIX + "round=1 " not in after, "the restored guest started over"
    # The two halves are one run, even where the pause cut a line: no round repeated,
    # none skipped.
    assert rounds_printed(before + after) == list(range(1, MEM_WALK_ROUNDS + 1))
    assert f"{PREFIX}done rounds={MEM_WALK_ROUNDS} verify=ok" in after
    finished = await api.get_vm(restored["id"])
    assert finished["exit"]["reason"] == "reset" and finished["exit"]["exit_status"] == 0

    # The same snapshot restores again (running at once), to the same end.
    second = await api.restore_vm(snap)
    assert second["state"] == "running"
    assert f"{PREFIX}done rounds={MEM_WALK_ROUNDS} verify=ok" in await output_of(
        api, second["id"])


async def test_a_vm_deleted_during_its_snapshot_is_released_after_it(
        daemon: Daemon, area: Path) -> None:
    """DELETE while a large snapshot is being written: the writer (a worker thread) keeps
    reading guest memory until it is done; the VM is released after it, and the daemon
    goes on (a VM released under the writer would crash it)."""
    api = daemon.api
    config = guest(area, "avmm.test=mem-walk avmm.mib=192 avmm.rounds=1000", memory_mib=200)
    vm_id = (await api.create_vm(config))["id"]
    await output_of(api, vm_id, until=PREFIX + "round=1 crc=")
    await api.pause(vm_id)
    outcome: list[httpx.Response] = []

    async def take() -> None:
        outcome.append(await daemon.post(f"/vms/{vm_id}/snapshot",
                                         {"path": str(area / "allowed" / "big")}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        with trio.fail_after(60):
            while not daemon.host.get(vm_id)._snapshotting:
                await trio.sleep(0.001)
        # Meanwhile the guest stays paused, and one snapshot at a time.
        busy = [await daemon.post(f"/vms/{vm_id}/resume", None),
                await daemon.post(f"/vms/{vm_id}/snapshot",
                                  {"path": str(area / "allowed" / "other")})]
        await api.delete_vm(vm_id)
        assert await api.list_vms() == []
    response = outcome[0]
    for answer in busy:  # unless the snapshot was done already
        assert answer.status_code == 409 or response.status_code == 201, answer.text
        if answer.status_code == 409:
            assert "snapshot" in answer.json()["error"]
    assert (area / "allowed" / "other").exists() == (busy[1].status_code == 201)
    # The snapshot was written whole (or refused in one line); the daemon serves on.
    assert response.status_code in (201, 400, 409), response.text
    if response.status_code == 201:
        assert response.json()["bytes_memory"] >= 192 << 20
    assert await api.list_vms() == []
    vm_id = (await api.create_vm(guest(area, "avmm.test=echo")))["id"]
    await api.send_console(vm_id, b"quit\n")
    assert "echo bye" in await output_of(api, vm_id)


async def test_restore_over_rest_with_a_vhost_user_disk_on_a_new_socket(
        daemon: Daemon, area: Path) -> None:
    """blk-write to a disk behind `avmm backend blk`, snapshotted mid-write over REST;
    restored with {"vhost_user": {"blk0": new socket}} on a new back-end process: the
    guest goes on from the saved request and the pattern on the disk is complete."""
    from tests.vhost.test_frontend import blk_backend
    from tests.virtio_guest_support import expected_pattern
    from tests.vm.helpers import MAILBOX_ADDRESS

    sectors, seed = 4 * 2048, 7
    allowed, api = area / "allowed", daemon.api
    image = allowed / "disk.img"
    image.write_bytes(bytes(sectors * 512))
    # One sector per request: slow enough that a loaded host still catches the guest
    # inside its write half (in bigger requests it was once done before the first look).
    config = {**guest(area, f"avmm.test=blk-write avmm.seed={seed} avmm.req=1",
                      memory_mib=64),
              "disk": [{"vhost_user": str(allowed / "blk.sock")}]}
    with blk_backend("avmm", image, allowed / "blk.sock"):
        vm_id = (await api.create_vm(config))["id"]
        memory = daemon.host.get(vm_id).vm.memory
        assert memory is not None
        with trio.fail_after(120):
            # Inside the write half: some sectors written, not all.
            while not 0 < memory.read_u64(MAILBOX_ADDRESS + 8) < sectors // 2:
                await trio.sleep(0.002)
        await api.pause(vm_id)
        await api.snapshot(vm_id, allowed / "snap")
        await api.delete_vm(vm_id)
    with image.open("rb") as f:
        f.seek((sectors - 1) * 512)
        assert f.read(512) == bytes(512)  # not written yet

    new_sock = allowed / "new.sock"
    with blk_backend("avmm", image, new_sock):
        unknown = error_of(await daemon.post("/vms", {
            "restore": str(allowed / "snap"), "vhost_user": {"blk9": str(new_sock)}}), 400)
        assert "blk9" in unknown["error"]
        restored = await api.restore_vm(allowed / "snap", vhost_user={"blk0": new_sock})
        assert restored["config"]["disk"][0]["vhost_user"] == str(new_sock)
        after = await output_of(api, restored["id"])
    assert f"blk0 written={sectors} verify=ok" in after, after
    assert (await api.get_vm(restored["id"]))["exit"]["exit_status"] == 0
    assert image.read_bytes() == expected_pattern(seed, sectors)
