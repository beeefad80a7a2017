"""A migrated VM keeps its limits: the destination, built from the config in the stream,
has the CPU controls and the disk's rate limit in effect on the source when it
migrated (changed at run time, not only as first configured)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.config import DiskConfig
from avmm.ratelimit import BucketConfig, RateLimitConfig
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require
from tests.ratelimit.support import admits
from tests.vm.helpers import with_machine

from .support import TIMEOUT_S, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


async def test_the_destination_has_the_limits_in_effect_on_the_source(
        tmp_path: Path) -> None:
    require(cgroup_cpu_problem())
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    configured = RateLimitConfig(ops=BucketConfig(size=5, refill_ms=100))
    changed = RateLimitConfig(ops=BucketConfig(size=8, refill_ms=100, one_time_burst=3))
    base = guest_config("avmm.test=blk-bench avmm.rw=read avmm.n=1000000000")
    config = dataclasses.replace(with_machine(base, cpu_weight=300),
                                 disks=(DiskConfig(image, rate_limit=configured),))
    address = f"unix:{tmp_path / 'in.sock'}"
    with trio.fail_after(TIMEOUT_S * 2):
        async with VirtualMachine.receive(address) as destination:
            async with VirtualMachine(config) as source:
                await admits(source.virtio_slots[0].device, 10)
                source.rate_limits.set("disk", 0, None, changed)
                await source.set_cpu_limits(max_percent=60.5)
                await source.migrate(address)
                assert (await source.wait()).reason is StopReason.MIGRATED
            while destination.state is not VmState.RUNNING:
                assert destination.exit is None, destination.exit
                await trio.sleep(0.02)
            assert destination.config.disks[0].rate_limit == changed
            assert destination.rate_limits.to_dict()["disks"][0]["rate_limit"] == \
                changed.to_dict()
            assert destination.cpu_limits.weight == 300
            assert destination.cpu_limits.max_percent == 60.5
            assert destination.config.machine.cpu_max_percent == 60.5
            # The destination's disk is served through its limiter.
            await admits(destination.virtio_slots[0].device, 1)
            destination.stop()
            end = await destination.wait()
    assert end.reason is StopReason.STOPPED, end
