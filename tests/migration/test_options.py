"""What the caller chooses: ``on_timeout="abort"`` gives up when the rounds do not
converge (the guest runs on), ``"pause"`` finishes anyway; a destination config whose
machine does not match is refused before any memory is sent; a VM paused before the
migration stays paused, and ``start=False`` keeps it paused on the destination until
``resume()``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.migration import MigrationError

from .support import TIMEOUT_S, check_walk, collect, guest_config, mem_walk, read_until

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

ROUNDS = 1000


async def test_abort_gives_up_and_pause_finishes(tmp_path: Path) -> None:
    before, after = bytearray(), bytearray()
    config = guest_config(mem_walk(ROUNDS))
    with trio.fail_after(TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery, VirtualMachine(config) as source:
            nursery.start_soon(collect, source, before)
            await read_until(before, "mem-walk round=2 crc=")
            # One round, 1 ms of downtime: the walking guest dirties far more than that.
            async with VirtualMachine.receive(f"unix:{tmp_path / 'a.sock'}") as refused:
                with pytest.raises(MigrationError) as caught:
                    await source.migrate(f"unix:{tmp_path / 'a.sock'}", downtime_ms=1,
                                         max_rounds=1, on_timeout="abort")
                assert "did not converge" in str(caught.value)
                assert source.state is VmState.RUNNING
                assert (await refused.wait()).reason is StopReason.ERROR

            # A destination whose machine differs is refused before memory is sent.
            other = dataclasses.replace(config, machine=dataclasses.replace(
                config.machine, memory_mib=64))
            async with VirtualMachine.receive(f"unix:{tmp_path / 'b.sock'}",
                                              config=other) as mismatched:
                with pytest.raises(MigrationError) as caught:
                    await source.migrate(f"unix:{tmp_path / 'b.sock'}")
                assert "machine.memory_mib" in str(caught.value)
                assert source.migration is not None and source.migration.pages_sent == 0
                await mismatched.wait()
            assert source.state is VmState.RUNNING

            async with VirtualMachine.receive(f"unix:{tmp_path / 'c.sock'}") as destination:
                progress = await source.migrate(f"unix:{tmp_path / 'c.sock'}",
                                                downtime_ms=1, max_rounds=1)
                assert progress.state == "completed" and progress.round == 1
                assert (await source.wait()).reason is StopReason.MIGRATED
                nursery.start_soon(collect, destination, after)
                end = await destination.wait()
    assert not end.failed, end
    check_walk(before.decode(), after.decode(), rounds=ROUNDS)


async def test_a_paused_vm_arrives_paused_with_start_false(tmp_path: Path) -> None:
    before, after = bytearray(), bytearray()
    with trio.fail_after(TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery, \
                VirtualMachine.receive(f"unix:{tmp_path / 'in.sock'}",
                                       start=False) as destination:
            async with VirtualMachine(guest_config(mem_walk(ROUNDS))) as source:
                nursery.start_soon(collect, source, before)
                await read_until(before, "mem-walk round=2 crc=")
                await source.pause()
                await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                assert (await source.wait()).reason is StopReason.MIGRATED
            assert destination.state is VmState.PAUSED
            nursery.start_soon(collect, destination, after)
            await trio.sleep(0.5)
            assert b"crc=" not in after, "the paused destination ran"
            await destination.resume()
            end = await destination.wait()
    assert not end.failed, end
    check_walk(before.decode(), after.decode(), rounds=ROUNDS)
