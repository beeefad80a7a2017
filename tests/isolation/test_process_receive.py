"""An incoming live migration given no config, into a daemon in ``--isolation process``:
the daemon accepts the source and reads the stream's header and config itself (the
jail is planned from that config), then hands the worker the connection and the bytes
it read; the worker reads them again first and goes on as a destination of none mode.
A hostile first frame ends the VM (reason error) before any worker exists, and leaves
nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient
from avmm.config import DiskConfig
from avmm.migration.destination import StreamedConfigError
from avmm.migration.stream import ERROR, FRAME_HEADER, HEADER, VERSION, Kind
from avmm.state.codec import encode
from avmm.state.vm_state import config_to_state
from tests.api.test_daemon import avmm
from tests.isolation.test_process_mode import (
    _config,
    _echo,
    _echo_here,
    _links,
    _status,
    _until_stopped,
    guest_config_echo,
    process_daemon,
)
from tests.migration.support import MEM_WALK_ROUNDS, check_walk, mem_walk
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

TIMEOUT_S = 180


async def _follow(api: ApiClient, vm_id: str, output: bytearray) -> None:
    async with api.console(vm_id) as chunks:
        async for chunk in chunks:
            output += chunk


async def _wait_for(output: bytearray, text: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        while text.encode() not in output:
            await trio.sleep(0.02)


async def _wait_stopped(api: ApiClient, vm_id: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT_S):
        while (vm := await api.get_vm(vm_id))["state"] != "stopped":
            await trio.sleep(0.05)
    return vm


async def test_mem_walk_migrates_into_a_worker_of_a_daemon_given_no_config(
    tmp_path: Path,
) -> None:
    """Two daemons in process mode; the destination's POST /vms/incoming has no config.
    The guest rewrites its memory all along, goes on in the destination's jailed worker
    from the round it was in and ends verify=ok; the source's VM ends migrated."""
    listen = f"unix:{tmp_path / 'in.sock'}"
    config = _config("mem-walk")
    config["boot"]["cmdline"] = mem_walk()
    before, after = bytearray(), bytearray()
    async with process_daemon("--jail-uid-range", "64200-64299") as (_a, api_a, _ja), \
            process_daemon() as (daemon_b, api_b, jail_b), trio.open_nursery() as nursery:
        incoming = await api_b.receive_vm(listen)
        on_b = incoming["id"]
        assert incoming["state"] == "incoming" and incoming["isolation"] == "process"
        assert incoming["config"] is None and incoming["pid"] is None
        assert incoming["migration"]["state"] == "incoming", incoming["migration"]
        assert stat.S_IMODE(os.stat(tmp_path / "in.sock").st_mode) == 0o600
        assert (await api_b.get_vm(on_b))["state"] == "incoming"

        source = await api_a.create_vm(config)
        on_a = source["id"]
        nursery.start_soon(_follow, api_a, on_a, before)
        nursery.start_soon(_follow, api_b, on_b, after)
        await _wait_for(before, "mem-walk round=2 crc=")
        started = await api_a.migrate(on_a, listen)
        assert started["migration"] is not None, started
        moved = await _wait_stopped(api_a, on_a)
        assert moved["exit"]["reason"] == "migrated", moved["exit"]
        assert moved["migration"]["state"] == "completed", moved["migration"]

        landed = await api_b.get_vm(on_b)
        assert landed["state"] in ("running", "stopping", "stopped"), landed
        assert landed["name"] == on_a  # it goes on under the source VM's name
        assert landed["config"]["boot"]["cmdline"] == config["boot"]["cmdline"]
        assert landed["isolation"] == "process"
        if landed["state"] == "running":  # a jailed, unprivileged worker runs it
            status = _status(landed["pid"])
            assert status["NoNewPrivs"] == "1" and status["Uid"].split()[0] != "0"
        assert not (tmp_path / "in.sock").exists()
        end = await _wait_stopped(api_b, on_b)
        # The guest's own end (debug-exit after verify=ok), not a failure.
        assert end["exit"]["reason"] != "error", end["exit"]
        assert end["exit"]["exit_status"] in (0, 1), end["exit"]
        assert end["migration"]["state"] == "completed", end["migration"]
        assert not (jail_b / on_b).exists()
        log = daemon_b.stderr.read_text()
        assert "SIGSYS" not in log and "Traceback" not in log, log[-3000:]
        nursery.cancel_scope.cancel()
    assert "done" not in before.decode()
    assert "mem-walk round=1 " not in after.decode(), "the destination started over"
    check_walk(before.decode(), after.decode(), rounds=MEM_WALK_ROUNDS)


async def test_avmm_receive_without_config_in_process_mode_prints_the_new_vm(
    tmp_path: Path,
) -> None:
    """``avmm receive --listen`` with no --config: the new VM's id, state incoming; the
    echo guest then comes over TCP (a port the kernel picks) into its worker and
    answers there."""
    from avmm.host import Host

    async with process_daemon() as (daemon, api, jail_root), Host() as source_host:
        received = await avmm("receive", "--listen", "tcp:127.0.0.1:0",
                              socket=daemon.socket)
        assert received.returncode == 0, received.stderr.decode()
        vm_id = received.stdout.decode().strip()
        incoming = await api.get_vm(vm_id)
        assert incoming["state"] == "incoming" and incoming["isolation"] == "process"
        address = incoming["migration"]["address"]
        assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")

        source = await source_host.create(guest_config_echo())
        await source.migrate(address)
        assert (await source.wait()).reason.value == "migrated"
        with trio.fail_after(TIMEOUT_S):
            while (vm := await api.get_vm(vm_id))["state"] != "running":
                assert vm["state"] == "incoming", vm
                await trio.sleep(0.05)
        assert vm["migration"]["state"] == "completed", vm["migration"]
        assert isinstance(vm["pid"], int) and vm["pid"] != daemon.process.pid
        assert b"echo came by tcp" in await _echo(api, vm_id, "came by tcp")
        await api.delete_vm(vm_id)
        assert not (jail_root / vm_id).exists()
        assert "SIGSYS" not in daemon.stderr.read_text()


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.build({"kind": kind, "length": len(payload)}) + payload


def _header() -> bytes:
    return HEADER.build({"version": VERSION, "writer": "hostile"})


def _config_frame(*, disks: tuple[Path, ...] = ()) -> bytes:
    """A CONFIG frame of a 32 MiB test guest with raw ``disks``."""
    config = dataclasses.replace(guest_config("avmm.test=hello", memory_mib=32),
                                 disks=tuple(DiskConfig(path=path) for path in disks))
    return _frame(Kind.CONFIG, encode(config_to_state(config)))


#: name -> (what the hostile source sends, words of the VM's exit detail)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "not a migration stream": (b"GET / HTTP/1.1\r\n\r\n" + bytes(32), "magic"),
    "pages before the config": (_header() + _frame(Kind.PAGES, b"\0\0"), "before CONFIG"),
    "a config frame too large": (_header() + FRAME_HEADER.build(
        {"kind": Kind.CONFIG, "length": 1 << 20}), "at most"),
    "a config that is not one": (_header() + _frame(Kind.CONFIG, b"\x01" * 64),
                                 "the streamed config"),
    "a config naming a missing disk": (_header() + _config_frame(
        disks=(Path("/nonexistent/disk.img"),)), "file not found"),
    "an unknown frame kind": (_header() + _frame(99), "unknown frame kind 99"),
    "a cut header": (b"AVMMMIGR\x03", "ended in the stream header"),
}


async def _send_hostile(path: Path, data: bytes) -> bytes:
    """Connect, send ``data`` (then nothing more), and read what comes back until the
    daemon closes."""
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            answer = bytearray()
            # The daemon closes without reading the rest: a reset after its answer.
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some():
                    answer += chunk
    return bytes(answer)


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_opening_ends_the_incoming_vm_before_any_worker(
    tmp_path: Path, case: str,
) -> None:
    data, words = HOSTILE[case]
    async with process_daemon() as (daemon, api, jail_root):
        neighbour = await api.create_vm(_config("echo"))
        await api.list_vms()
        fds_before = sorted(_links(daemon.process.pid))
        incoming = await api.receive_vm(f"unix:{tmp_path / 'in.sock'}")
        answer = await _send_hostile(tmp_path / "in.sock", data)
        vm = await _until_stopped(api, incoming["id"])
        _check_refused(vm, answer, words)
        assert vm["pid"] is None and vm["config"] is None, vm
        # Nothing is left: no socket file, no jail, no worker, no fd of the daemon's.
        assert not (tmp_path / "in.sock").exists()
        assert not (jail_root / incoming["id"]).exists()
        assert f"[worker {incoming['id']}]" not in daemon.stderr.read_text()
        await api.delete_vm(incoming["id"])
        assert sorted(_links(daemon.process.pid)) == fds_before
        # The daemon runs on, and so does its other VM.
        assert daemon.process.poll() is None
        assert b"echo still here" in await _echo(api, neighbour["id"], "still here")
        assert "Traceback" not in daemon.stderr.read_text()


def _check_refused(vm: dict[str, Any], answer: bytes, words: str) -> None:
    """The VM ended as a destination of none mode that refused, with ``words`` in its
    detail, and the source was told in an ERROR frame: the same, or for a config this
    host cannot use, only that (never which of this host's files it looked for)."""
    assert vm["exit"]["reason"] == "error", vm["exit"]
    assert vm["exit"]["detail"].startswith("incoming migration failed: "), vm["exit"]
    assert words in vm["exit"]["detail"], vm["exit"]
    assert vm["migration"]["state"] == "failed", vm["migration"]
    assert words in vm["migration"]["error"], vm["migration"]
    kind, length = struct.unpack("<BI", answer[:5])
    assert kind == Kind.ERROR, answer[:40]
    message = ERROR.parse(answer[5:5 + length]).message
    assert message.startswith("the destination refused: "), message
    if "the streamed config" in vm["exit"]["detail"]:
        assert message == f"the destination refused: {StreamedConfigError.public}", message
    else:
        assert words in message, message


async def test_a_streamed_config_the_jail_cannot_hold_ends_the_vm_and_its_worker(
    tmp_path: Path,
) -> None:
    """A config read well whose disk lies outside --allow-path: the jail cannot be
    made (past the stream's parse, so a worker may have been started): the VM ends
    with reason error, the source is told, and nothing is left. Its kernel, never read
    by an incoming VM, is not bound: outside the allowed directories too, it is no
    reason to refuse."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside.img"
    outside.write_bytes(bytes(1 << 20))
    data = _header() + _config_frame(disks=(outside,))
    async with process_daemon("--allow-path", str(allowed)) as (daemon, api, jail_root):
        await api.list_vms()
        fds_before = sorted(_links(daemon.process.pid))
        incoming = await api.receive_vm(f"unix:{allowed / 'in.sock'}")
        answer = await _send_hostile(allowed / "in.sock", data)
        vm = await _until_stopped(api, incoming["id"])
        _check_refused(vm, answer, str(outside))
        assert "kernel" not in vm["exit"]["detail"], vm["exit"]
        assert vm["pid"] is None, vm
        assert not (allowed / "in.sock").exists()
        assert not (jail_root / incoming["id"]).exists()
        await api.delete_vm(incoming["id"])
        with trio.fail_after(10):  # a worker started and killed: its fds go with it
            while sorted(_links(daemon.process.pid)) != fds_before:
                await trio.sleep(0.05)
        assert daemon.process.poll() is None
        assert "Traceback" not in daemon.stderr.read_text()


async def test_an_incoming_vm_given_no_config_times_out_or_stops_cleanly(
    tmp_path: Path,
) -> None:
    """No source within accept_timeout_s: error, as in none mode; a DELETE while it
    waits: stopped. The socket file goes either way; no worker ever starts."""
    async with process_daemon() as (daemon, api, jail_root):
        waited = await api.receive_vm(f"unix:{tmp_path / 'a.sock'}", accept_timeout_s=0.5)
        vm = await _until_stopped(api, waited["id"])
        assert vm["exit"]["reason"] == "error", vm["exit"]
        assert "no source connected within 0.5 s" in vm["exit"]["detail"], vm["exit"]
        assert not (tmp_path / "a.sock").exists()

        stopped = await api.receive_vm(f"unix:{tmp_path / 'b.sock'}")
        assert (await api.get_vm(stopped["id"]))["state"] == "incoming"
        with trio.fail_after(30):
            await api.delete_vm(stopped["id"])
        assert not (tmp_path / "b.sock").exists()
        assert [vm["id"] for vm in await api.list_vms()] == [waited["id"]]
        assert not jail_root.exists() or list(jail_root.iterdir()) == []
        assert "[worker " not in daemon.stderr.read_text()


async def test_a_vm_given_no_config_that_lands_in_a_worker_answers_there(
    tmp_path: Path,
) -> None:
    """The echo guest from a dense Host in this process, over a unix socket, into a
    worker of a daemon given no config: the worker builds from its own reading of
    the stream, which the daemon's planned jail matches."""
    from avmm.host import Host

    listen = f"unix:{tmp_path / 'in.sock'}"
    async with process_daemon() as (daemon, api, jail_root), Host() as source_host:
        incoming = await api.receive_vm(listen)
        source = await source_host.create(guest_config_echo())
        await _echo_here(source, "before")
        await source.migrate(listen)
        with trio.fail_after(TIMEOUT_S):
            while (vm := await api.get_vm(incoming["id"]))["state"] != "running":
                await trio.sleep(0.05)
        assert vm["config"]["machine"]["memory_mib"] == 32, vm["config"]
        assert b"echo in the jail" in await _echo(api, incoming["id"], "in the jail")
        await api.delete_vm(incoming["id"])
        assert not (jail_root / incoming["id"]).exists()
        assert "SIGSYS" not in daemon.stderr.read_text()
