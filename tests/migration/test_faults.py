"""A migration that fails at any point leaves the source VM running as before: the
stream cut at many points (header, config, early memory, mid-page, round markers,
device state, END, the destination's ACK), a corrupted byte (the SHA-256 at the end
does not match), a destination that answers garbage, a destination killed half-way.
Each time the guest runs on at the source; after all of them a last migration
succeeds and the guest ends ``verify=ok`` where it landed. A destination that received
a broken stream never ran the guest and says why."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.migration import MigrationError
from avmm.migration.stream import Kind

from .proxy import Fault, Proxy
from .support import (
    TIMEOUT_S,
    Receiver,
    check_walk,
    collect,
    guest_config,
    mem_walk,
    read_until,
)

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

ROUNDS = 2000

FAULTS = [
    Fault("in the stream header", None),
    Fault("in the config", Kind.CONFIG, at=10),
    Fault("the destination's READY lost", Kind.READY, backwards=True, action="drop"),
    # 32 MiB of RAM: round 0 is 4 PAGES frames of 8 MiB (stream.MAX_FRAME_PAGES).
    Fault("early in memory", Kind.PAGES, index=1),
    Fault("inside a page batch", Kind.PAGES, index=2, at=5000),
    Fault("at the first dirty round", Kind.ROUND, index=1),
    Fault("in the device state", Kind.STATE, at=100),
    Fault("before END", Kind.END),
    Fault("inside END", Kind.END, at=8),
    Fault("the destination's ACK lost", Kind.ACK, backwards=True, action="drop"),
    Fault("a corrupted page", Kind.PAGES, index=0, action="flip"),
]


async def attempt_through(source: VirtualMachine, fault: Fault, tmp_path: Path) -> None:
    """Migrate ``source`` through a proxy that strikes with ``fault``: the migration
    fails, the source runs on, the destination never ran."""
    target = tmp_path / f"dest-{id(fault)}.sock"
    relay = tmp_path / f"proxy-{id(fault)}.sock"
    async with VirtualMachine.receive(f"unix:{target}") as destination, \
            trio.open_nursery() as nursery:
        proxy = Proxy(relay, f"unix:{target}", fault)
        await nursery.start(proxy.run)
        with pytest.raises(MigrationError) as caught:
            await source.migrate(f"unix:{relay}")
        assert proxy.struck, fault.name
        assert source.state is VmState.RUNNING, fault.name
        assert source.migration is not None and source.migration.state == "failed"
        assert "\n" not in str(caught.value)
        end = await destination.wait()
    assert end.reason is StopReason.ERROR, (fault.name, end)
    assert "incoming migration failed" in end.detail, end
    assert destination.migration is not None and destination.migration.state == "failed"
    if fault.action == "flip":
        assert "SHA-256" in str(caught.value), caught.value


async def garbage_destination(path: Path, task_status: trio.TaskStatus[None]) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    listener = trio.SocketListener(sock)
    task_status.started()
    client = await listener.accept()
    await listener.aclose()
    async with client:
        await client.send_all(os.urandom(4096))
        await trio.sleep_forever()


async def test_the_source_runs_on_after_every_failure(tmp_path: Path) -> None:
    output = bytearray()
    after = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery, \
                VirtualMachine(guest_config(mem_walk(ROUNDS))) as source:
            nursery.start_soon(collect, source, output)
            await read_until(output, "mem-walk round=2 crc=")
            for fault in FAULTS:
                await attempt_through(source, fault, tmp_path)

            # A destination that answers garbage.
            async with trio.open_nursery() as fake:
                await fake.start(garbage_destination, tmp_path / "garbage.sock")
                with pytest.raises(MigrationError):
                    await source.migrate(f"unix:{tmp_path / 'garbage.sock'}")
                fake.cancel_scope.cancel()
            assert source.state is VmState.RUNNING

            # A destination killed half-way (its own process).
            receiver = Receiver(f"unix:{tmp_path / 'killed.sock'}")
            async with trio.open_nursery() as inner:
                await inner.start(receiver.run)
                assert receiver.process is not None

                async def kill_when_under_way() -> None:
                    while (source.migration is None or source.migration.state != "precopy"
                           or source.migration.pages_sent < 1000):
                        await trio.sleep(0)
                    receiver.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]

                inner.start_soon(kill_when_under_way)
                with pytest.raises(MigrationError):
                    await source.migrate(receiver.listen_address)
            assert source.state is VmState.RUNNING

            # Still the same guest, still walking: a last migration succeeds.
            printed = len(output)
            await read_until(output, "crc=", timeout=TIMEOUT_S)
            assert "done" not in output.decode(), "the walk ended before the last try"
            async with VirtualMachine.receive(f"unix:{tmp_path / 'last.sock'}") as last:
                await source.migrate(f"unix:{tmp_path / 'last.sock'}")
                assert (await source.wait()).reason is StopReason.MIGRATED
                nursery.start_soon(collect, last, after)
                end = await last.wait()
            assert printed <= len(output)
    assert not end.failed, end
    check_walk(output.decode(), after.decode(), rounds=ROUNDS)


async def test_a_vm_that_stops_during_the_migration(tmp_path: Path) -> None:
    """The source gives up between two frames: the destination reads whole frames, then
    the source's ERROR line (not a frame cut in half, whose missing bytes it would read
    from the ERROR frame), and never runs the guest."""
    output = bytearray()
    address = f"unix:{tmp_path / 'in.sock'}"
    relay = tmp_path / "relay.sock"
    # 128 MiB: round 0 is 16 frames, so the stop lands while frames are under way; the
    # relay (a proxy that never strikes) is slower than the source, whose sends then
    # wait half-way through frames.
    config = guest_config(mem_walk(ROUNDS), memory_mib=128)
    with trio.fail_after(TIMEOUT_S * 2):
        async with VirtualMachine.receive(address) as destination:
            async with trio.open_nursery() as nursery, VirtualMachine(config) as source:
                nursery.start_soon(collect, source, output)
                await nursery.start(Proxy(relay, address, Fault("never", Kind.COMMIT,
                                                                index=1)).run)
                await read_until(output, "mem-walk round=1 crc=")

                async def stop_when_under_way() -> None:
                    while source.migration is None or source.migration.pages_sent < 4096:
                        await trio.sleep(0)
                    source.stop()

                nursery.start_soon(stop_when_under_way)
                with pytest.raises(MigrationError, match="stopped during the migration"):
                    await source.migrate(f"unix:{relay}")
            end = await destination.wait()
    assert end.reason is StopReason.ERROR, end
    assert "the source gave up" in end.detail, end
    assert "stopped during the migration" in end.detail, end
    assert destination.migration is not None and destination.migration.state == "failed"
