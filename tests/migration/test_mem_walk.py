"""Live migration of the test guest's mem-walk (README, "Live migration"): the guest
rewrites its RAM while it is migrated, goes on on the destination from the round it
was in, and verifies every word of its memory there (``verify=ok``); the source VM ends
``migrated``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState

from .support import MEM_WALK, TIMEOUT_S, check_walk, collect, guest_config, read_until

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
