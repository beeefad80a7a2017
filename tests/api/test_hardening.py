"""The management API against hostile clients: bodies that break parsers, WebSocket
upgrades, paths that are FIFOs or lie outside ``--allow-path``, and VM builds that fail
over and over (the daemon's fds and threads must come back to where they were)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from avmm.api import ApiClient, ApiError, serve_api
from avmm.errors import PathNotAllowedError, VmStartError
from avmm.paths import PathPolicy
from tests.vm.helpers import TEST_GUEST

from .fake_host import FakeHost


def _config(kernel: Path, **extra: Any) -> dict[str, Any]:
    return {"boot": {"kernel": str(kernel), "cmdline": "avmm.test=hello"},
            "machine": {"memory_mib": 32, "acpi": False}, "serial": {"mode": "none"}, **extra}


async def _post(api: ApiClient, body: bytes, content_type: str) -> httpx.Response:
    return await api._http.post("/vms", content=body, headers={"content-type": content_type})


# -- bodies that break parsers: 400, and the daemon goes on ------------------------------

BAD_BODIES = [
    ("json-deep-arrays", b"[" * 5000 + b"]" * 5000, "application/json"),
    ("json-deep-objects", b'{"a": ' * 5000 + b"1" + b"}" * 5000, "application/json"),
    ("json-5000-digit-int", b'{"machine": {"vcpus": ' + b"1" * 5000 + b"}}",
     "application/json"),
    ("toml-deep-arrays", b"a = " + b"[" * 5000 + b"]" * 5000, "application/toml"),
    ("toml-deep-tables", b"a = " + b"{b = " * 5000 + b"1" + b"}" * 5000, "application/toml"),
    ("toml-5000-digit-int", b"[machine]\nvcpus = " + b"1" * 5000, "application/toml"),
]


@pytest.mark.parametrize(("case", "body", "content_type"), BAD_BODIES,
                         ids=[case[0] for case in BAD_BODIES])
async def test_bodies_that_break_the_parsers_are_400(
        api: ApiClient, kernel_file: Path, case: str, body: bytes, content_type: str) -> None:
    response = await _post(api, body, content_type)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error", "detail"}
    assert "not valid" in response.json()["error"]
    assert (await api.create_vm(_config(kernel_file)))["state"] == "running"


def _raw_exchange(path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(os.fspath(path))
        client.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            chunk = client.recv(65536)
            if not chunk:
                break
            response += chunk
        return response


async def test_a_websocket_upgrade_is_400(nursery: trio.Nursery, socket_dir: Path,
                                          fake_host: FakeHost) -> None:
    path = await nursery.start(serve_api, fake_host, socket_dir / "avmm.sock")
    request = (b"GET /vms HTTP/1.1\r\nHost: avmm\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    response = await trio.to_thread.run_sync(_raw_exchange, path, request)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 ", response
    assert json.loads(body)["detail"] == {"upgrade": "websocket"}
    async with ApiClient(path) as api:
        assert await api.list_vms() == []


# -- output paths ---------------------------------------------------------------------------

async def test_a_fifo_as_serial_path_is_400_naming_the_key(
        api: ApiClient, kernel_file: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "serial.log"
    os.mkfifo(fifo)
    with trio.fail_after(30), pytest.raises(ApiError) as error:
        await api.create_vm(_config(kernel_file, serial={"mode": "file", "path": str(fifo)}))
    assert (error.value.status, error.value.detail["key"]) == (400, "serial.path")
    with trio.fail_after(30), pytest.raises(ApiError) as error:
        await api.create_vm(_config(kernel_file, console={"mode": "file", "path": str(fifo)}))
    assert (error.value.status, error.value.detail["key"]) == (400, "console.path")


async def test_a_regular_file_as_console_socket_is_400_and_kept(
        api: ApiClient, kernel_file: Path, socket_dir: Path) -> None:
    precious = socket_dir / "precious"
    precious.write_text("keep me\n")
    with pytest.raises(ApiError) as error:
        await api.create_vm(_config(kernel_file,
                                    console={"mode": "socket", "path": str(precious)}))
    assert (error.value.status, error.value.detail["key"]) == (400, "console.path")
    assert precious.read_text() == "keep me\n"


# -- --allow-path: 403 naming the key --------------------------------------------------------

@pytest.fixture
def area() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="avmm-allow-", dir="/tmp"))
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def restricted_api(nursery: trio.Nursery, area: Path, fake_host: FakeHost
                         ) -> AsyncIterator[ApiClient]:
    policy = PathPolicy([area / "allowed"])
    path = await nursery.start(lambda task_status: serve_api(
        fake_host, area / "avmm.sock", paths=policy, task_status=task_status))
    async with ApiClient(path) as client:
        yield client
    policy.close()


def _socket_file(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.fspath(path))
    listener.listen(1)
    return listener


async def test_paths_outside_allow_path_are_403_naming_the_key(
        restricted_api: ApiClient, area: Path, fake_host: FakeHost) -> None:
    allowed, outside = area / "allowed", area / "outside"
    for directory in (allowed, outside):
        (directory / "vmlinux").write_bytes(b"\x7fELF fake")
        (directory / "disk.img").write_bytes(bytes(4096))
    sockets = [_socket_file(allowed / "b.sock"), _socket_file(outside / "b.sock")]
    (allowed / "escape").symlink_to("../outside/vmlinux")
    try:
        kernel = allowed / "vmlinux"
        created = await restricted_api.create_vm(_config(kernel, disk=[
            {"path": str(allowed / "disk.img")}, {"vhost_user": str(allowed / "b.sock")}],
            console={"mode": "socket", "path": str(allowed / "console.sock")}))
        assert created["state"] == "running"
        # The policy travels with the config to the Host, which opens the files with it.
        cases = [
            ("boot.kernel", _config(outside / "vmlinux")),
            ("boot.kernel", _config(allowed / "escape")),
            ("boot.kernel", _config(Path(f"{allowed}/../outside/vmlinux"))),
            ("boot.initrd", {**_config(kernel), "boot": {"kernel": str(kernel),
                                                        "initrd": "/etc/passwd"}}),
            ("disk[0].path", _config(kernel, disk=[{"path": str(outside / "disk.img"),
                                                    "readonly": True}])),
            ("disk[0].vhost_user", _config(kernel, disk=[{"vhost_user":
                                                          str(outside / "b.sock")}])),
            ("net[0].vhost_user", _config(kernel, net=[{"vhost_user":
                                                        str(outside / "b.sock")}])),
            ("vhost_user[0].socket", _config(kernel, vhost_user=[
                {"socket": str(outside / "b.sock"), "device_id": 4}])),
            ("serial.path", _config(kernel, serial={"mode": "file",
                                                    "path": str(outside / "serial.log")})),
            ("console.path", _config(kernel, console={"mode": "file",
                                                      "path": str(outside / "c.log")})),
            ("console.path", _config(kernel, console={"mode": "socket",
                                                      "path": str(outside / "c.sock")})),
        ]
        for key, config in cases:
            with pytest.raises(ApiError) as error:
                await restricted_api.create_vm(config)
            assert (error.value.status, error.value.detail["key"]) == (403, key), config
            assert "allow" in error.value.message
        # Whether a file exists outside is not told either.
        with pytest.raises(ApiError) as error:
            await restricted_api.create_vm(_config(outside / "no-such-kernel"))
        assert error.value.status == 403
        assert not (outside / "serial.log").exists() and not (outside / "c.sock").exists()
        assert len(fake_host.vms) == 1
    finally:
        for listener in sockets:
            listener.close()


def test_a_refusal_of_the_build_is_403_naming_key_and_step() -> None:
    """The build opens through the same policy (see the next test); its refusal is a
    403 too, not a 422."""
    from avmm.api._app import _http_error

    error = VmStartError("vm", "loading the kernel /x", "boot.kernel: outside",
                         PathNotAllowedError("outside", key="boot.kernel"))
    http = _http_error(error)
    assert (http.status, http.detail) == (403, {"key": "boot.kernel",
                                                "step": "loading the kernel /x"})


@pytest.mark.kvm
@pytest.mark.guest
async def test_the_build_refuses_what_validation_did_not_see(area: Path) -> None:
    from avmm.config import config_from_dict
    from avmm.vm import VirtualMachine

    allowed = area / "allowed"
    shutil.copy(TEST_GUEST, allowed / "guest.elf")
    (area / "outside" / "guest.elf").write_bytes(TEST_GUEST.read_bytes())
    policy = PathPolicy([allowed])
    try:
        config = config_from_dict(_config(allowed / "guest.elf"), base_dir=None,
                                  path_check=policy.check)
        # Swapped after validation: now a symlink that leads out.
        (allowed / "guest.elf").unlink()
        (allowed / "guest.elf").symlink_to("../outside/guest.elf")
        with pytest.raises(VmStartError) as info:
            async with VirtualMachine(config, paths=policy):
                pass
        assert isinstance(info.value.error, PathNotAllowedError)
        assert info.value.error.key == "boot.kernel"
    finally:
        policy.close()


# -- a real daemon: failing builds leak nothing; a FIFO never freezes it ---------------------

_AVMM = [sys.executable, "-c", "import sys; from avmm.cli import main; sys.exit(main())"]


@pytest.fixture
async def real_daemon(socket_dir: Path) -> AsyncIterator[tuple[trio.Process, Path]]:
    """A daemon in dense mode (--isolation none, pinned: process is root's default): the
    tests count the fds and threads that VM builds leave in the daemon's own process,
    and a FIFO opened by a build on its event loop, which only dense mode has."""
    socket_path = socket_dir / "avmm.sock"
    log = socket_dir / "serve.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [*_AVMM, "--log-level", "warning", "serve", "--socket", str(socket_path),
             "--isolation", "none"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        with trio.fail_after(60):
            while not socket_path.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        yield process, socket_path
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()


def _daemon_counts(pid: int) -> tuple[int, int]:
    """The daemon's open fds, and its threads less trio's idle cached workers (they go
    after 10 s idle on their own)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    busy = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        busy += not name.startswith("Trio thread")
    return fds, busy


@pytest.mark.kvm
@pytest.mark.guest
async def test_twenty_failed_builds_in_a_real_daemon_leak_no_fd_or_thread(
        real_daemon: tuple[trio.Process, Path], socket_dir: Path) -> None:
    process, socket_path = real_daemon
    not_a_kernel = socket_dir / "not-a-kernel"
    not_a_kernel.write_text("text\n")
    big_initrd = socket_dir / "initrd.img"
    with big_initrd.open("wb") as f:
        f.truncate(64 << 20)
    disk = socket_dir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    busy = _socket_file(socket_dir / "busy.sock")  # a live server where a console goes
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(socket_dir / "stale.sock"))  # no one listens: connect fails
    stale.close()
    full = {"disk": [{"path": str(disk)}], "rng": {}}
    failing = [
        _config(not_a_kernel, **full,
                console={"mode": "socket", "path": str(socket_dir / "c.sock")}),
        {**_config(TEST_GUEST, **full), "boot": {"kernel": str(TEST_GUEST),
                                                  "initrd": str(big_initrd)}},
        _config(TEST_GUEST, **full, console={"mode": "socket",
                                             "path": str(socket_dir / "busy.sock")}),
        _config(TEST_GUEST, **full, vhost_user=[{"socket": str(socket_dir / "stale.sock"),
                                                 "device_id": 4}]),
        # A directory where no socket can be made (even by root).
        _config(TEST_GUEST, **full, console={"mode": "socket", "path": "/proc/avmm.sock"}),
    ]
    try:
        async with ApiClient(socket_path) as api:
            warm = await api.create_vm({**_config(TEST_GUEST), "machine": {
                "memory_mib": 32, "acpi": False, "vcpus": 2}})
            await api.stop(warm["id"])
            await api.delete_vm(warm["id"])
            with pytest.raises(ApiError):
                await api.create_vm(failing[0])
            await trio.sleep(0.5)
            baseline = _daemon_counts(process.pid)
            steps = set()
            for index in range(20):
                with pytest.raises(ApiError) as error:
                    await api.create_vm(failing[index % len(failing)])
                assert error.value.status == 422, error.value.message
                steps.add(error.value.detail["step"].split(" ")[0])
            assert len(steps) >= 3, steps
            assert await api.list_vms() == []
            with trio.move_on_after(60):
                while _daemon_counts(process.pid) != baseline:
                    await trio.sleep(0.1)
            assert _daemon_counts(process.pid) == baseline
            assert (socket_dir / "busy.sock").exists()  # a live server is left alone
    finally:
        busy.close()


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_fifo_never_freezes_the_real_daemon(
        real_daemon: tuple[trio.Process, Path], tmp_path: Path) -> None:
    _process, socket_path = real_daemon
    fifo = tmp_path / "serial.log"
    os.mkfifo(fifo)
    async with ApiClient(socket_path) as api, trio.open_nursery() as nursery:
        result: dict[str, int] = {}

        async def create() -> None:
            try:
                await api.create_vm(_config(TEST_GUEST, serial={"mode": "file",
                                                                "path": str(fifo)}))
            except ApiError as e:
                result["status"] = e.status

        nursery.start_soon(create)
        with trio.fail_after(30):
            # Other clients are served all along.
            for _ in range(10):
                assert await api.list_vms() == []
                await trio.sleep(0.05)
    assert result["status"] == 400


async def test_serve_with_group_and_allow_path_refuses_paths_outside(area: Path) -> None:
    """`avmm serve --group G --allow-path DIR` as a process: the socket is 0660 and a
    config naming a file outside DIR is a 403 (`avmm run`: exit 1, one line)."""
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name
    socket_path = area / "avmm.sock"
    (area / "outside" / "vmlinux").write_bytes(b"\x7fELF fake")
    log = area / "serve.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [*_AVMM, "serve", "--socket", str(socket_path), "--group", group,
             "--allow-path", str(area / "allowed")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        with trio.fail_after(60):
            while not socket_path.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660
        async with ApiClient(socket_path) as api:
            with pytest.raises(ApiError) as error:
                await api.create_vm(_config(area / "outside" / "vmlinux"))
            assert (error.value.status, error.value.detail["key"]) == (403, "boot.kernel")
        vm_toml = area / "outside" / "vm.toml"
        vm_toml.write_text('[boot]\nkernel = "vmlinux"\n')
        result = await trio.run_process(
            [*_AVMM, "run", str(vm_toml), "--socket", str(socket_path)],
            capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 1
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "boot.kernel" in lines[0] and "allow" in lines[0]
    finally:
        process.terminate()
        with trio.fail_after(60):
            await process.wait()
