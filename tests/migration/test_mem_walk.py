"""Live migration of the test guest's mem-walk (README, "Live migration"): the guest
rewrites its RAM while it is migrated, goes on on the destination from the round it
was in, and verifies every word of its memory there (``verify=ok``); the source VM ends
``migrated``."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState

from .support import (
    MEM_WALK,
    TIMEOUT_S,
    Receiver,
    check_walk,
    collect,
    guest_config,
    read_until,
)

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


async def test_mem_walk_migrates_between_two_vms_over_unix(tmp_path: Path) -> None:
    socket_path = tmp_path / "in.sock"
    before, after = bytearray(), bytearray()
    with trio.fail_after(TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery, \
                VirtualMachine.receive(f"unix:{socket_path}") as destination:
            assert destination.state is VmState.INCOMING
            assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
            async with VirtualMachine(guest_config(MEM_WALK)) as source:
                nursery.start_soon(collect, source, before)
                await read_until(before, "mem-walk round=2 crc=")
                progress = await source.migrate(f"unix:{socket_path}")
                result = await source.wait()
            assert result.reason is StopReason.MIGRATED
            assert progress.state == "completed" and source.migration == progress
            assert progress.pages_sent >= progress.pages_total > 0
            assert progress.downtime_ms is not None
            assert destination.state in (VmState.RUNNING, VmState.STOPPING, VmState.STOPPED)
            nursery.start_soon(collect, destination, after)
            end = await destination.wait()
    assert not end.failed, end
    assert not socket_path.exists(), "the listener's socket file was left behind"
    assert destination.migration is not None and destination.migration.state == "completed"
    assert "done" not in before.decode()
    assert "mem-walk round=1 " not in after.decode(), "the destination started over"
    check_walk(before.decode(), after.decode())


async def run_source_until_migrated(to: str, **migrate: object) -> tuple[str, object]:
    """Boot mem-walk here, migrate it to ``to`` during round 3; its output here and
    the migration's progress."""
    before = bytearray()
    async with trio.open_nursery() as nursery:
        async with VirtualMachine(guest_config(MEM_WALK)) as source:
            nursery.start_soon(collect, source, before)
            await read_until(before, "mem-walk round=2 crc=")
            progress = await source.migrate(to, **migrate)  # type: ignore[arg-type]
            result = await source.wait()
        assert result.reason is StopReason.MIGRATED, result
    return before.decode(), progress


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_mem_walk_migrates_to_another_process(tmp_path: Path, transport: str) -> None:
    address = f"unix:{tmp_path / 'in.sock'}" if transport == "unix" else "tcp:127.0.0.1:0"
    receiver = Receiver(address)
    with trio.fail_after(TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            before, _ = await run_source_until_migrated(receiver.listen_address)
        assert receiver.process is not None
    stderr = receiver.stderr.decode()
    assert receiver.process.returncode == 0, stderr[-3000:]
    assert "migration completed" in stderr.splitlines()[-1]
    check_walk(before, receiver.stdout.decode())


async def test_a_to_b_to_a_to_b(tmp_path: Path) -> None:
    """The same guest migrated four times back and forth (a received VM migrated on:
    dirty logging, device state and the vCPUs restored from a stream must all be
    migratable again); every hop lands mid-walk and the walk ends verify=ok."""
    outputs: list[bytearray] = []
    hops = ["b1", "a2", "b2", "a3"]
    with trio.fail_after(TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            current = await stack.enter_async_context(VirtualMachine(guest_config(MEM_WALK)))
            outputs.append(bytearray())
            nursery.start_soon(collect, current, outputs[-1])
            await read_until(outputs[-1], "mem-walk round=2 crc=")
            for hop in hops:
                address = f"unix:{tmp_path / hop}.sock"
                receiving = await stack.enter_async_context(VirtualMachine.receive(address))
                progress = await current.migrate(address)
                assert (await current.wait()).reason is StopReason.MIGRATED, hop
                assert progress.state == "completed"
                outputs.append(bytearray())
                nursery.start_soon(collect, receiving, outputs[-1])
                current = receiving
                await read_until(outputs[-1], "crc=")  # it walks on here first
            end = await current.wait()
    assert not end.failed, end
    texts = [output.decode() for output in outputs]
    assert all("mem-walk done" not in text for text in texts[:-1]), "a hop came too late"
    check_walk(*texts)
