"""SYNC/SYNCED (stream version 3): the source pauses the guest only once the
destination has stored and hashed everything sent before (so that this work is never
downtime), and a destination answers SYNC only when it has; a malformed SYNC is
refused like any hostile frame."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.migration import MigrationError
from avmm.migration.stream import KIND_DATA, Channel, Kind

from .support import MEM_WALK, TIMEOUT_S, guest_config
from .test_hostile_stream import CONFIG, frame, header, raw_pages, send_hostile

pytestmark = [pytest.mark.kvm]


async def test_the_source_pauses_only_after_the_destinations_synced(tmp_path: Path) -> None:
    """A scripted destination: at SYNC the source's guest still runs (and keeps running
    while SYNCED is held back); after SYNCED the STATE frame comes from a paused guest.
    Then it refuses, and the source's guest runs on."""
    path = tmp_path / "in.sock"
    seen: list[tuple[Kind, VmState]] = []

    async def destination(listener: trio.SocketListener, vm: VirtualMachine) -> None:
        stream = await listener.accept()
        async with stream:
            channel = Channel(stream)
            await channel.receive_header()
            kind, _ = await channel.receive()
            assert kind is Kind.CONFIG
            await channel.send(Kind.READY)
            while True:
                kind, _ = await channel.receive()
                if kind in (Kind.SYNC, Kind.STATE):
                    seen.append((kind, vm.state))
                if kind is Kind.SYNC:
                    await trio.sleep(0.3)  # SYNCED held back: the guest must run on
                    seen.append((kind, vm.state))
                    await channel.send(Kind.SYNCED)
                if kind is Kind.STATE:
                    await channel.send_error("scripted refusal")
                    return

    with trio.fail_after(TIMEOUT_S):
        async with VirtualMachine(guest_config(MEM_WALK)) as vm:
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(str(path))
            sock.listen(1)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination, listener, vm)
                with pytest.raises(MigrationError, match="scripted refusal"):
                    await vm.migrate(f"unix:{path}")
            await listener.aclose()
            assert vm.state is VmState.RUNNING
            # Dirty logging is off again (it stays on through the stop-and-copy).
            assert vm.memory is not None and vm.memory.dirty is None
            vm.stop()
        assert (await vm.wait()).reason is StopReason.STOPPED
    assert seen == [(Kind.SYNC, VmState.RUNNING), (Kind.SYNC, VmState.RUNNING),
                    (Kind.STATE, VmState.PAUSED)]


async def test_the_destination_answers_sync_once_it_has_everything(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'in.sock'}"
    page = bytes(range(256)) * 16
    async with VirtualMachine.receive(address) as vm:
        stream = await trio.open_unix_socket(address.removeprefix("unix:"))
        async with stream:
            channel = Channel(stream)
            await stream.send_all(header() + CONFIG)
            kind, _ = await channel.receive()
            assert kind is Kind.READY
            await stream.send_all(raw_pages([(5, 1, KIND_DATA)], page) + frame(Kind.SYNC))
            with trio.fail_after(60):
                kind, _ = await channel.receive()
            assert kind is Kind.SYNCED
            assert vm.memory is not None and vm.memory.read(5 * 4096, 4096) == page
        await vm.wait()


async def test_a_sync_frame_with_a_payload_is_refused(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'in.sock'}"
    with trio.fail_after(120):
        async with VirtualMachine.receive(address) as vm:
            answer = await send_hostile(address, header() + CONFIG + frame(Kind.SYNC, b"x"),
                                        None)
            end = await vm.wait()
    assert end.reason is StopReason.ERROR
    assert "SYNC" in end.detail and "SYNC" in answer
