"""Helpers for migration tests: the mem-walk guest on a source VM, its serial output
collected on both sides, a destination receiving it.

The guest walks many rounds (``MEM_WALK_ROUNDS``) so that it is still walking when a
migration ends, however slow the host: it verifies every word of its buffer after each
round, and prints ``verify=ok`` at the end only if all of them held.
"""

from __future__ import annotations

import trio

from avmm import VirtualMachine
from tests.snapshot.support import TIMEOUT_S
from tests.state.mem_walk import PREFIX, expected_lines, mem_walk_lines
from tests.vm.helpers import guest_config

__all__ = [
    "MEM_WALK",
    "TIMEOUT_S",
    "check_walk",
    "collect",
    "guest_config",
    "mem_walk_lines",
    "read_until",
]

MEM_WALK_MIB = 16
MEM_WALK_ROUNDS = 400
MEM_WALK = f"avmm.test=mem-walk avmm.mib={MEM_WALK_MIB} avmm.rounds={MEM_WALK_ROUNDS}"
#: The rounds whose CRC the host computes itself (cheap enough); the guest's own
#: per-round verification covers the others.
CHECKED_ROUNDS = 8


async def collect(vm: VirtualMachine, output: bytearray) -> None:
    """Append everything the guest prints to ``output`` until its serial port closes
    (the VM stopped)."""
    async for chunk in vm.serial:
        output += chunk


async def read_until(output: bytearray, text: str, timeout: float = TIMEOUT_S) -> None:
    """Wait until a collecting task has put ``text`` into ``output``."""
    with trio.fail_after(timeout):
        while text.encode() not in output:
            await trio.sleep(0.01)


def rounds_printed(output: str) -> list[int]:
    return [int(line.split("round=")[1].split()[0]) for line in mem_walk_lines(output)
            if " round=" in line]


_EXPECTED_START = expected_lines(MEM_WALK_MIB, CHECKED_ROUNDS)[:CHECKED_ROUNDS]


def check_walk(*parts: str) -> None:
    """The outputs of the guest's successive homes make one uninterrupted walk: every
    round once, in order, the first CRCs as the host computes them, ``verify=ok``."""
    output = "".join(parts)
    lines = mem_walk_lines(output)
    assert rounds_printed(output) == list(range(1, MEM_WALK_ROUNDS + 1)), output[-2000:]
    assert lines[:CHECKED_ROUNDS] == _EXPECTED_START
    assert lines[-1] == f"{PREFIX}mem-walk done rounds={MEM_WALK_ROUNDS} verify=ok"
