"""The test guest's ``mem-walk`` scenario under QEMU microvm prints the lines the host's
model of it computes, as it does under avmm (tests/state/test_mem_walk.py): the CRCs
are a property of the guest, not of the VMM it runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.state.mem_walk import expected_lines, mem_walk_lines
from tests.test_guest_qemu import ACCELS, STATUS_POWER_OFF, run_guest

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

MIB, ROUNDS = 2, 5


@pytest.fixture(scope="module")
def expected() -> list[str]:
    return expected_lines(MIB, ROUNDS, seed=3)


@pytest.mark.parametrize("accel", ACCELS)
def test_mem_walk_under_qemu_prints_the_models_lines(test_guest: Path, accel: str,
                                                     expected: list[str]) -> None:
    status, lines = run_guest(
        test_guest, accel, f"avmm.test=mem-walk avmm.mib={MIB} avmm.rounds={ROUNDS} "
                           "avmm.seed=3 avmm.base=0x1000000")
    assert mem_walk_lines("\n".join(lines)) == expected, lines
    assert status == STATUS_POWER_OFF
