"""virtio-rng against a hostile driver (see fuzz_support for what every episode checks).

The device's own checks: every request it answers gets exactly min(its writable bytes,
MAX_REQUEST_BYTES) random bytes, and after a reset a request of any length gets them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

from avmm.virtio.device import DeviceNeedsReset
from avmm.virtio.rng import MAX_REQUEST_BYTES, RngDevice

from .fuzz_chains import (
    WRITABLE,
    Planned,
    Request,
    split_length,
)
from .fuzz_support import (
    HOSTILE_TARGET,
    FuzzGuest,
    FuzzTarget,
    Round,
    fuzz,
    new_round,
    run_until_idle,
    well_formed_round,
)

EPISODES = 3000


class RngTarget(FuzzTarget):
    name = "rng"
    roles = (WRITABLE,)
    drained = frozenset({0})
    queue_max_sizes = RngDevice.queue_max_sizes

    def __init__(self) -> None:
        self.device = RngDevice()

    def well_formed(self, rng: random.Random, queue: int, features: int) -> Request:
        length = (rng.randint(MAX_REQUEST_BYTES - 16, MAX_REQUEST_BYTES + 4096)
                  if rng.random() < 0.03 else rng.randint(1, 600))
        return Request([], split_length(rng, length))

    def stops(self, queue: int, plan: Planned, features: int) -> bool:
        # "The driver MUST NOT place device-readable buffers into the requestq."
        return bool(plan.readable)

    async def serve(self, round_: Round, tasks: Sequence[Callable[[], Awaitable[object]]]
                    ) -> DeviceNeedsReset | None:
        return await run_until_idle(self.device, round_.context, tasks)

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        plans = {plan.head: plan for plan in round_.reached(0)}
        for head, written in round_.guest.queues[0].pushes:
            assert written == min(plans[head].writable_length, MAX_REQUEST_BYTES), (
                f"rng answered {written} bytes to a request of {plans[head].writable_length}")

    def reset(self) -> None:
        self.device.reset()

    async def check_after_reset(self, guest: FuzzGuest, rng: random.Random) -> None:
        round_ = new_round(self, guest, rng, sizes=(16, 32))
        length = rng.randint(32, 4096)
        request = Request([], split_length(rng, length))
        (plan,) = await well_formed_round(self, round_, [(0, request)])
        assert guest.queues[0].pushes == [(plan.head, length)]
        data = plan.writable_bytes(round_.memory.data)
        # Random bytes: equal to what the buffer held before with probability 2^-256.
        assert data != plan.writable_bytes(round_.snapshot)
        assert len(set(data)) > 1


def test_hostile_driver(fuzz_report: Callable[[str], None]) -> None:
    """At least 10,000 ring- and descriptor-level hostile chains: the device only ever
    stops with DeviceNeedsReset where it must, never writes outside the writable buffers
    it was given, and serves a well-formed request after each reset."""
    tally = fuzz(RngTarget(), EPISODES)
    fuzz_report(tally.line())
    assert tally.hostile >= HOSTILE_TARGET, tally.line()
