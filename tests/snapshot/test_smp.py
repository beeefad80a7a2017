"""Two vCPUs snapshotted wherever they are (the boot CPU starting the other with INIT,
SIPI, SIPI and waiting for it to report in; both running; the second waiting for its
SIPI) and restored in a new ``avmm up --restore`` process end like a run that was never
stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.errors import VmStateError

from .support import console_config, drain, restore_in_new_process, run_to_end

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

SMP = "avmm.test=smp"
DELAYS_MS = [0, 2, 5, 10, 20, 40]


async def test_two_vcpus_go_on_from_wherever_they_were(tmp_path: Path) -> None:
    reference = await run_to_end(console_config(SMP, vcpus=2))
    assert "smp cpus=2 reported=2" in reference, reference
    mid_run = 0
    for delay_ms in DELAYS_MS:
        path = tmp_path / f"at{delay_ms}ms"
        output = bytearray()
        async with VirtualMachine(console_config(SMP, vcpus=2)) as vm:
            await trio.sleep(delay_ms / 1000)
            try:
                await vm.pause()
            except VmStateError:
                continue  # the guest was already done: nothing to snapshot
            await drain(vm, output)
            await vm.snapshot(path)
            vm.stop()
        before = output.decode()
        mid_run += "reported=" not in before
        restored = await restore_in_new_process(path)
        assert restored.returncode == 0, restored.stderr.decode()
        assert before + restored.stdout.decode() == reference, delay_ms
    assert mid_run, "every run ended before its snapshot: nothing was tested"
