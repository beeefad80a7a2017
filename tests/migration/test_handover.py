"""The hand-over's last steps: the guest never runs on both sides, and a failure after
COMMIT never loses it.

* COMMIT never reaches the destination (the stream cut right there): the source cannot
  know whether the destination runs the guest, so the VM stays paused, its migration
  ``unconfirmed``; the destination never ran it. Resumed by the operator, the guest
  goes on and a later migration ends ``verify=ok``.
* The destination's STARTED is lost: the guest runs at the destination, the source
  stays paused (never running it a second time).
* The destination cannot start the guest: it answers ERROR (no vCPU ran; it starts
  its machine parked before ACK, so the ERROR comes in place of ACK; a hand-over that
  fails after COMMIT is test_parked_start's) and the source lets the guest run on by
  itself.

Each of these fails on a source that stops with ``migrated`` as soon as COMMIT is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.errors import VmStartError
from avmm.migration import HandOverUnconfirmed, MigrationError
from avmm.migration.stream import Kind

from .proxy import Fault, Proxy
from .support import (
    TIMEOUT_S,
    check_refused_after_commit,
    check_walk,
    collect,
    guest_config,
    mem_walk,
    read_until,
)

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

ROUNDS = 2000


@asynccontextmanager
async def walking_source() -> AsyncIterator[tuple[VirtualMachine, bytearray, trio.Nursery]]:
    """A source VM whose mem-walk has begun, its output collected."""
    output = bytearray()
    async with trio.open_nursery() as nursery, \
            VirtualMachine(guest_config(mem_walk(ROUNDS))) as source:
        nursery.start_soon(collect, source, output)
        await read_until(output, "mem-walk round=2 crc=")
        yield source, output, nursery


async def migrate_through(source: VirtualMachine, fault: Fault, tmp_path: Path,
                          destination_address: str) -> BaseException:
    relay = tmp_path / f"relay-{fault.kind}.sock"
    async with trio.open_nursery() as nursery:
        proxy = Proxy(relay, destination_address, fault)
        await nursery.start(proxy.run)
        with pytest.raises(MigrationError) as caught:
            await source.migrate(f"unix:{relay}")
        assert proxy.struck, fault.name
    assert "\n" not in str(caught.value)
    return caught.value


async def test_a_commit_that_never_arrives_leaves_the_guest_paused_then_resumable(
        tmp_path: Path) -> None:
    after = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, nursery):
            target = f"unix:{tmp_path / 'dest.sock'}"
            async with VirtualMachine.receive(target) as destination:
                error = await migrate_through(
                    source, Fault("COMMIT cut", Kind.COMMIT), tmp_path, target)
                end = await destination.wait()
            assert isinstance(error, HandOverUnconfirmed), error
            assert "unconfirmed" in str(error) and "paused" in str(error), error
            # Not resumed by itself (the guest could run there), not stopped (lost).
            assert source.state is VmState.PAUSED
            assert source.migration is not None
            assert source.migration.state == "unconfirmed"
            assert source.migration.downtime_ms is not None
            # The destination never had COMMIT: it never ran the guest.
            assert end.reason is StopReason.ERROR, end
            assert "incoming migration failed" in end.detail, end

            printed = len(output)
            await trio.sleep(0.3)
            assert len(output) == printed, "the paused source ran the guest"
            await source.resume()
            await read_until(output, "crc=", timeout=TIMEOUT_S)
            assert "done" not in output.decode(), "the walk ended before the last try"

            # Still the same guest: a last migration hands it over for good.
            async with VirtualMachine.receive(f"unix:{tmp_path / 'last.sock'}") as last:
                await source.migrate(f"unix:{tmp_path / 'last.sock'}")
                assert (await source.wait()).reason is StopReason.MIGRATED
                assert source.migration is not None
                assert source.migration.state == "completed"
                nursery.start_soon(collect, last, after)
                last_end = await last.wait()
    assert not last_end.failed, last_end
    check_walk(output.decode(), after.decode(), rounds=ROUNDS)


async def test_a_lost_started_keeps_the_source_paused_while_the_destination_runs(
        tmp_path: Path) -> None:
    after = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, nursery):
            target = f"unix:{tmp_path / 'dest.sock'}"
            async with VirtualMachine.receive(target) as destination:
                nursery.start_soon(collect, destination, after)
                error = await migrate_through(
                    source, Fault("STARTED lost", Kind.STARTED, backwards=True,
                                  action="drop"),
                    tmp_path, target)
                assert isinstance(error, HandOverUnconfirmed), error
                assert source.state is VmState.PAUSED
                assert source.migration is not None
                assert source.migration.state == "unconfirmed"
                printed = len(output)
                end = await destination.wait()  # the guest walks to its end there
            # The source never ran the guest again meanwhile.
            assert source.state is VmState.PAUSED
            assert len(output) == printed
            source.stop()
    assert not end.failed, end
    assert destination.migration is not None
    assert destination.migration.state == "completed"
    check_walk(output.decode(), after.decode(), rounds=ROUNDS)


async def test_a_destination_that_cannot_start_lets_the_source_run_on(
        tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            address = f"unix:{tmp_path / 'dest.sock'}"
            async with VirtualMachine.receive(address) as destination:

                async def cannot_start(**_options: bool) -> VirtualMachine:
                    raise VmStartError(destination.name, "starting the device tasks",
                                       "injected failure")

                destination._start_built = cannot_start  # type: ignore[method-assign]
                with pytest.raises(MigrationError) as caught:
                    await source.migrate(address)
                end = await destination.wait()
            check_refused_after_commit(caught.value, source, end)
            result = await source.wait()  # the walk goes on to its end here
    assert not result.failed, result
    check_walk(output.decode(), rounds=ROUNDS)
