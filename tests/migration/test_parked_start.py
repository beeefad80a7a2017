"""The destination starts its machine before COMMIT, parked: device tasks and vCPU
threads exist, every vCPU waits before its first KVM_RUN, and the guest runs not one
instruction there until COMMIT lets it go (so that COMMIT costs no thread creation in
the guest-visible downtime).

A proxy holds the source's COMMIT back. Meanwhile the destination's vCPU threads are
there and parked, the VM is still ``incoming`` (resume() refuses it), its copy of the
guest's progress word is the one the paused source holds, and the guest made no exit
but the kick that parked each vCPU. Then:

* COMMIT goes through: the guest walks on at the destination from where it stopped.
* COMMIT never arrives (the connection cut there): the destination ends as any failed
  incoming VM (``error``, "incoming migration failed"), the guest never having run.
* The destination is stopped by its owner meanwhile: it refuses; the source, told so,
  lets the guest run on.
* The destination cannot let go after COMMIT: it answers ERROR (no vCPU ran) and the
  source lets the guest run on.
* The code holding the destination is cancelled meanwhile: the same, the guest never
  having run there.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.config import RngConfig
from avmm.errors import VmStartError, VmStateError
from avmm.migration import HandOverUnconfirmed, MigrationError
from avmm.migration.stream import Kind
from avmm.vm_virtio import VirtioMmioSlot
from tests.vm.helpers import MAILBOX_ADDRESS

from .proxy import Fault, Proxy
from .support import (
    TIMEOUT_S,
    check_refused_after_commit,
    collect,
    guest_config,
    mem_walk,
    read_until,
    rounds_printed,
)

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

ROUNDS = 2000
VCPUS = 2
#: mem-walk's progress word (tests/guest/README.md, "mem-walk"): pages written or checked
#: so far, stored after each page.
PROGRESS_ADDRESS = MAILBOX_ADDRESS + 64
HOLD_COMMIT = Fault("COMMIT held", Kind.COMMIT, action="hold")


@asynccontextmanager
async def walking_source() -> AsyncIterator[tuple[VirtualMachine, bytearray, trio.Nursery]]:
    """A source VM of two vCPUs whose mem-walk has begun, its output collected."""
    output = bytearray()
    async with trio.open_nursery() as nursery, \
            VirtualMachine(guest_config(mem_walk(ROUNDS), vcpus=VCPUS)) as source:
        nursery.start_soon(collect, source, output)
        await read_until(output, "mem-walk round=2 crc=")
        yield source, output, nursery


@asynccontextmanager
async def behind_a_proxy(tmp_path: Path) -> AsyncIterator[
        tuple[VirtualMachine, Path, Proxy, trio.Nursery]]:
    """A destination receiving on ``dest.sock``, and a proxy to it on the relay socket
    (yielded) that holds the source's COMMIT back; a nursery for the test's tasks."""
    target = f"unix:{tmp_path / 'dest.sock'}"
    relay = tmp_path / "relay.sock"
    async with VirtualMachine.receive(target) as destination, trio.open_nursery() as inner:
        proxy = Proxy(relay, target, HOLD_COMMIT)
        await inner.start(proxy.run)
        yield destination, relay, proxy, inner


def progress(vm: VirtualMachine) -> int:
    assert vm.memory is not None
    value: int = struct.unpack("<Q", vm.memory.read(PROGRESS_ADDRESS, 8))[0]
    return value


async def commit_held(source: VirtualMachine, destination: VirtualMachine,
                      proxy: Proxy) -> None:
    """Wait until COMMIT is held in the proxy and the destination's machine has started
    parked; check that the guest has not run there."""
    with trio.fail_after(TIMEOUT_S):
        await proxy.holding.wait()
        # A bound for a hang, not a speed target: each vCPU thread starts and parks.
        while not (len(destination.vcpu_threads) == VCPUS
                   and destination._pause.all_parked()):
            await trio.sleep(0.005)
    assert source.state is VmState.PAUSED
    assert source.migration is not None and source.migration.state == "stop-and-copy"
    # Started, but not for anyone to see or touch: still incoming.
    assert destination.state is VmState.INCOMING
    assert destination.migration is not None
    assert destination.migration.state == "receiving"
    with pytest.raises(VmStateError):
        await destination.resume()
    with pytest.raises(VmStateError):
        await destination.pause()
    assert destination.state is VmState.INCOMING
    # Not one instruction ran there: the guest's progress word is where the paused
    # source left it (mem-walk stores it after every page), and each vCPU made only
    # the exit of the kick that parked it before its first KVM_RUN.
    assert progress(destination) == progress(source)
    await trio.sleep(0.2)
    assert progress(destination) == progress(source)
    assert destination._pause.all_parked()
    assert guest_never_ran(destination)


async def walks_on(output: bytearray) -> None:
    """Wait until the guest prints its next round (a bound for a hang, not a target)."""
    rounds = output.count(b"crc=")
    with trio.fail_after(TIMEOUT_S):
        while output.count(b"crc=") <= rounds:
            await trio.sleep(0.01)


def guest_never_ran(destination: VirtualMachine) -> bool:
    exits = destination.vcpu_exit_counts()
    return set(exits) <= {"Interrupted"} and exits.get("Interrupted", 0) <= VCPUS


async def test_the_destination_starts_parked_and_runs_the_guest_only_after_commit(
        tmp_path: Path) -> None:
    after = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            async with behind_a_proxy(tmp_path) as (destination, relay, proxy, inner):
                migrated = trio.Event()

                async def migrate() -> None:
                    await source.migrate(f"unix:{relay}")
                    migrated.set()

                inner.start_soon(migrate)
                inner.start_soon(collect, destination, after)
                await commit_held(source, destination, proxy)
                assert not after  # the destination's serial is silent while parked
                at_pause = progress(source)
                proxy.let_go()
                await migrated.wait()
                assert (await source.wait()).reason is StopReason.MIGRATED
                assert destination.state is VmState.RUNNING
                assert destination.migration is not None
                assert destination.migration.state == "completed"
                # The guest walks on there, from where it stopped.
                await walks_on(after)
                assert progress(destination) > at_pause
                destination.stop()
                inner.cancel_scope.cancel()
            assert (await destination.wait()).reason is StopReason.STOPPED
    rounds = rounds_printed(output.decode() + after.decode())
    assert rounds == list(range(1, len(rounds) + 1)), rounds
    assert len(rounds) > len(rounds_printed(output.decode()))


async def test_a_commit_that_never_arrives_ends_the_parked_destination_unrun(
        tmp_path: Path) -> None:
    printed = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            async with behind_a_proxy(tmp_path) as (destination, relay, proxy, inner):
                errors: list[BaseException] = []

                async def migrate() -> None:
                    try:
                        await source.migrate(f"unix:{relay}")
                    except MigrationError as e:
                        errors.append(e)

                inner.start_soon(migrate)
                await commit_held(source, destination, proxy)
                inner.start_soon(collect, destination, printed)
                proxy.cut()
                end = await destination.wait()
            assert end.reason is StopReason.ERROR, end
            assert "incoming migration failed" in end.detail, end
            assert destination.migration is not None
            assert destination.migration.state == "failed"
            assert destination.vcpu_threads == []
            assert guest_never_ran(destination), destination.vcpu_exit_counts()
            assert not printed
            # The source sent COMMIT and never heard back: paused, for the operator.
            assert len(errors) == 1 and isinstance(errors[0], HandOverUnconfirmed)
            assert source.state is VmState.PAUSED
            await source.resume()
            await walks_on(output)
            source.stop()


async def test_a_parked_destination_stopped_meanwhile_lets_the_source_run_on(
        tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            async with behind_a_proxy(tmp_path) as (destination, relay, proxy, inner):
                await inner.start(_migrating, source, relay)
                await commit_held(source, destination, proxy)
                destination.stop("not wanted after all")
                end = await destination.wait()
                # The source hears the refusal (the answer to its COMMIT): no vCPU ran
                # there, so the guest runs on here.
                with trio.fail_after(TIMEOUT_S):
                    await source.wait_state(VmState.RUNNING)
                proxy.cut()
            assert (end.reason, end.detail) == (StopReason.STOPPED, "not wanted after all")
            assert destination.migration is not None
            assert destination.migration.state == "failed"
            assert "stopped before the hand-over" in (destination.migration.error or "")
            assert guest_never_ran(destination), destination.vcpu_exit_counts()
            assert source.migration is not None and source.migration.state == "failed"
            await walks_on(output)
            source.stop()


async def test_a_destination_that_cannot_let_go_after_commit_lets_the_source_run_on(
        tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            address = f"unix:{tmp_path / 'dest.sock'}"
            async with VirtualMachine.receive(address) as destination:

                async def cannot_let_go() -> None:
                    raise VmStartError(destination.name, "resuming the device tasks",
                                       "injected failure")

                destination._hand_over = cannot_let_go  # type: ignore[method-assign]
                with pytest.raises(MigrationError) as caught:
                    await source.migrate(address)
                end = await destination.wait()
            check_refused_after_commit(caught.value, source, end)
            assert guest_never_ran(destination), destination.vcpu_exit_counts()
            await walks_on(output)
            source.stop()


async def test_a_stop_while_the_hand_over_resumes_the_devices_is_answered_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that lands while the hand-over resumes the restored devices (a trio
    checkpoint per slot: a DELETE, a daemon shutting down) keeps every vCPU parked, and
    the source must hear that nothing ran here (ERROR), not STARTED: otherwise the guest
    runs on neither side."""
    config = dataclasses.replace(guest_config(mem_walk(ROUNDS), vcpus=VCPUS),
                                 rng=RngConfig())
    resume = VirtioMmioSlot.resume
    stopped_during_resume: list[str] = []
    destinations: list[VirtualMachine] = []

    async def resume_then_stopped(slot: VirtioMmioSlot) -> None:
        for destination in destinations:
            if slot in destination.virtio_slots and destination.state is VmState.INCOMING:
                destination.stop("deleted during the hand-over")
                stopped_during_resume.append(slot.device.name)
        await resume(slot)

    monkeypatch.setattr(VirtioMmioSlot, "resume", resume_then_stopped)
    output = bytearray()
    with trio.fail_after(TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery, VirtualMachine(config) as source:
            nursery.start_soon(collect, source, output)
            await read_until(output, "mem-walk round=2 crc=")
            address = f"unix:{tmp_path / 'dest.sock'}"
            async with VirtualMachine.receive(address) as destination:
                destinations.append(destination)
                with pytest.raises(MigrationError) as caught:
                    await source.migrate(address)
                end = await destination.wait()
            assert stopped_during_resume == ["rng0"]  # the window was hit
            assert not isinstance(caught.value, HandOverUnconfirmed), caught.value
            assert source.state is VmState.RUNNING
            assert (end.reason, end.detail) == (StopReason.STOPPED,
                                                "deleted during the hand-over")
            assert guest_never_ran(destination), destination.vcpu_exit_counts()
            await walks_on(output)
            source.stop()


async def test_a_parked_destination_whose_owner_is_cancelled_ends_unrun(
        tmp_path: Path) -> None:
    """The code that holds the incoming VM is cancelled while its machine is parked
    (an embedding service shutting down): the machine ends without running the guest,
    its threads are gone, and the source hears the refusal and lets the guest run on."""
    held: list[VirtualMachine] = []
    with trio.fail_after(TIMEOUT_S * 3):
        async with walking_source() as (source, output, _nursery):
            target = f"unix:{tmp_path / 'dest.sock'}"
            relay = tmp_path / "relay.sock"
            async with trio.open_nursery() as inner:
                proxy = Proxy(relay, target, HOLD_COMMIT)
                with trio.CancelScope() as owner:
                    async with VirtualMachine.receive(target) as destination:
                        held.append(destination)
                        await inner.start(proxy.run)
                        await inner.start(_migrating, source, relay)
                        await commit_held(source, destination, proxy)
                        owner.cancel()
                        await trio.sleep_forever()
                assert owner.cancelled_caught
                with trio.fail_after(TIMEOUT_S):
                    await source.wait_state(VmState.RUNNING)
                proxy.cut()
            destination = held[0]
            assert destination.state is VmState.STOPPED
            assert destination.migration is not None
            assert destination.migration.error == "cancelled before the hand-over"
            assert destination.vcpu_threads == []
            assert guest_never_ran(destination), destination.vcpu_exit_counts()
            assert source.migration is not None and source.migration.state == "failed"
            assert "the destination refused" in (source.migration.error or "")
            await walks_on(output)
            source.stop()


async def _migrating(source: VirtualMachine, relay: Path,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Migrate ``source`` through ``relay``; the migration is expected to fail."""
    task_status.started()
    with pytest.raises(MigrationError) as caught:
        await source.migrate(f"unix:{relay}")
    assert not isinstance(caught.value, HandOverUnconfirmed), caught.value
