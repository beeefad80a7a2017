"""The test guest's ``mem-walk`` scenario (tests/guest/README.md): under avmm it prints
the lines the host's model computes (QEMU's side: tests/test_guest_qemu_mem_walk.py),
keeps its round in the mailbox, and reports a word the host changed under it."""

from __future__ import annotations

import time

import pytest

from avmm import StopReason, VirtualMachine
from tests.state.bare_machine import BareMachine
from tests.state.mem_walk import (
    PAGE,
    PREFIX,
    STRIDE,
    expected_lines,
    mem_walk_lines,
    pages_processed,
)
from tests.vm.helpers import MAILBOX_ADDRESS, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

TIMEOUT_S = 120
BASE = 0x400000


async def test_mem_walk_under_avmm_prints_the_models_lines() -> None:
    config = guest_config("avmm.test=mem-walk avmm.mib=2 avmm.rounds=6 avmm.seed=3",
                          memory_mib=16)
    async with VirtualMachine(config) as vm:
        output = bytearray()
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
        assert vm.memory is not None
        assert vm.memory.read_u64(MAILBOX_ADDRESS + 8) == 6  # the last round
        # The progress word outside observers watch: one step per page handled.
        progress = vm.memory.read_u64(MAILBOX_ADDRESS + 64)
    assert progress == pages_processed(2, 6)
    assert mem_walk_lines(output.decode()) == expected_lines(2, 6, seed=3)
    assert result.reason is StopReason.RESET


def test_a_word_changed_under_the_guest_is_reported_with_its_address() -> None:
    """Stop the guest between rounds, change one word of a page the next two rounds do
    not rewrite, go on: the guest's check finds exactly that word."""
    mib, rounds = 16, 12
    with BareMachine(memory_mib=32, cmdline=f"avmm.test=mem-walk avmm.mib={mib} "
                                            f"avmm.rounds={rounds}") as machine:
        machine.start()
        deadline = time.monotonic() + TIMEOUT_S
        while "round=2 " not in machine.serial():
            assert not machine.finished.is_set(), machine.serial()
            assert time.monotonic() < deadline
            time.sleep(0.001)
        machine.stop()
        # The round line is printed before the mailbox moves on: the counter may lag.
        completed = machine.mailbox_counter()
        assert 1 <= completed < rounds - 2
        # A page near the end (checked last), in neither the round under way nor the
        # next: whichever of them checks it next sees the change.
        pages = mib * (1 << 20) // PAGE
        page = next(p for p in range(pages - 1, 0, -1)
                    if p % STRIDE not in {(completed + 1) % STRIDE, (completed + 2) % STRIDE})
        address = BASE + page * PAGE + 8 * 37
        machine.memory.write_u64(address, machine.memory.read_u64(address) ^ 1 << 40)
        machine.start()
        assert machine.wait(TIMEOUT_S), machine.serial()
        failure = mem_walk_lines(machine.serial())[-1]
    assert failure in (f"{PREFIX}mem-walk done rounds={r} verify=FAIL at {address:#x}"
                       for r in (completed + 1, completed + 2)), failure
    assert machine.exit_code == 1


@pytest.mark.parametrize(("options", "complaint"), [
    ("avmm.base=0x1000", "avmm.base: must be 4 KiB aligned, at or above 0x300000"),
    ("avmm.mib=0", "avmm.mib: must be 1..3072"),
    ("avmm.base=0xbff00000 avmm.mib=2",
     "avmm.base: must be 4 KiB aligned, at or above 0x300000, with the range below 0xc0000000"),
])
def test_bad_options_are_a_panic(options: str, complaint: str) -> None:
    with BareMachine(memory_mib=16, cmdline=f"avmm.test=mem-walk {options}") as machine:
        machine.start()
        assert machine.wait(TIMEOUT_S)
    assert f"{PREFIX}panic: {complaint}" in machine.serial()
    assert machine.exit_code == 1
