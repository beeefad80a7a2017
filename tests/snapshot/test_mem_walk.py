"""VM-level snapshot and restore of the test guest's mem-walk: snapshotted mid-walk by
``vm.snapshot()``, restored by ``avmm up --restore`` in a new process, the guest goes on
from the saved round (none repeated, none skipped) and verifies all of its memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.lifecycle import VmState
from tests.state.mem_walk import expected_lines, mem_walk_lines

from .support import (
    MEM_WALK,
    MEM_WALK_MIB,
    MEM_WALK_ROUNDS,
    console_config,
    read_until,
    restore_in_new_process,
    snapshot_at,
    snapshot_mid_walk,
)

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

EXPECTED = expected_lines(MEM_WALK_MIB, MEM_WALK_ROUNDS)


def rounds_printed(output: str) -> list[int]:
    return [int(line.split("round=")[1].split()[0]) for line in mem_walk_lines(output)
            if " round=" in line]


@pytest.mark.parametrize("memory", ["mapped", "copied"])
async def test_mem_walk_goes_on_from_the_saved_round_in_a_new_process(
        tmp_path: Path, memory: str) -> None:
    before = await snapshot_mid_walk(tmp_path / "snap")
    restored = await restore_in_new_process(
        tmp_path / "snap", *(["--copy-memory"] if memory == "copied" else []))
    assert restored.returncode == 0, restored.stderr.decode()
    after = restored.stdout.decode()
    assert "mem-walk round=1 " not in after, "the restored guest started over"
    # The snapshot fell inside round 3 or, on a loaded host, a later one (its line half
    # printed, or not yet): the restored process prints the rest, and the two halves are
    # exactly one uninterrupted run.
    assert mem_walk_lines(before + after) == EXPECTED
    assert rounds_printed(before + after) == list(range(1, MEM_WALK_ROUNDS + 1))
    assert 2 <= rounds_printed(after)[0] <= MEM_WALK_ROUNDS  # 2: only its crc was left


async def test_snapshot_restore_snapshot_restore(tmp_path: Path) -> None:
    """A restored guest (its RAM a private mapping of the first memory file) snapshotted
    again and restored again goes on from the second snapshot; the first snapshot is
    untouched by what the guest wrote since and restores again too."""
    first = await snapshot_mid_walk(tmp_path / "one", after_round=1)
    async with VirtualMachine.restore(tmp_path / "one") as vm:
        second = await snapshot_at(vm, bytearray(), "mem-walk round=4 crc=", tmp_path / "two")
        vm.stop()
    assert "done" not in second
    restored = await restore_in_new_process(tmp_path / "two")
    assert restored.returncode == 0, restored.stderr.decode()
    assert mem_walk_lines(first + second + restored.stdout.decode()) == EXPECTED

    again = await restore_in_new_process(tmp_path / "one")
    assert again.returncode == 0, again.stderr.decode()
    assert mem_walk_lines(first + again.stdout.decode()) == EXPECTED


async def test_restore_paused_waits_for_resume(tmp_path: Path) -> None:
    before = await snapshot_mid_walk(tmp_path / "snap")
    async with VirtualMachine.restore(tmp_path / "snap", start_paused=True) as vm:
        assert vm.state is VmState.PAUSED
        assert vm.exit is None
        await vm.resume()
        output = bytearray()
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    assert not result.failed, result
    assert mem_walk_lines(before + output.decode()) == EXPECTED


async def test_leaving_the_vm_while_it_is_snapshotted_waits_for_the_snapshot(
        tmp_path: Path) -> None:
    """The VM's context is left (stopping it) while a snapshot task is still writing from
    its worker thread: guest memory and the vCPUs are released only after it, and the
    snapshot is whole."""
    result: list[object] = []

    async def take(vm: VirtualMachine) -> None:
        result.append(await vm.snapshot(tmp_path / "snap"))

    async with trio.open_nursery() as nursery, VirtualMachine(console_config(MEM_WALK)) as vm:
        output = bytearray()
        await read_until(vm, output, "mem-walk round=2 crc=")
        await vm.pause()
        nursery.start_soon(take, vm)
        await trio.sleep(0.001)  # the snapshot has the VM; leave now
    assert result, "the snapshot did not complete"
    restored = await restore_in_new_process(tmp_path / "snap")
    assert restored.returncode == 0, restored.stderr.decode()
    assert mem_walk_lines(restored.stdout.decode())[-1] == EXPECTED[-1]
