"""virtio-console against a hostile driver (see fuzz_support for what every episode
checks), with host input typed while it runs.

The device's own checks: what reaches ``output`` is exactly the bytes of the transmit
chains it took, in order; what lands in receive buffers is exactly the input stream, in
order; after a reset the input it still held comes first, then new input, and new
output goes out whole.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

from avmm.virtio.console import ConsoleDevice
from avmm.virtio.device import DeviceNeedsReset

from .fuzz_chains import (
    READABLE,
    WRITABLE,
    Planned,
    Request,
    split,
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

EPISODES = 2500
RECEIVE, TRANSMIT = 0, 1


class ConsoleTarget(FuzzTarget):
    name = "console"
    roles = (WRITABLE, READABLE)
    drained = frozenset({TRANSMIT})
    queue_max_sizes = ConsoleDevice.queue_max_sizes

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.device = ConsoleDevice(output=self.output.append)
        #: Every byte send_input handed over (the device delivers them in this order).
        self.typed = bytearray()
        self.delivered_before = 0

    def well_formed(self, rng: random.Random, queue: int, features: int) -> Request:
        if queue == RECEIVE:
            return Request([], split_length(rng, rng.randint(1, 300)))
        return Request(split(rng, rng.randbytes(rng.randint(1, 400))), [])

    def stops(self, queue: int, plan: Planned, features: int) -> bool:
        # §5.3.6.2: device-writable buffers in the transmitq, readable in the receiveq.
        return bool(plan.writable if queue == TRANSMIT else plan.readable)

    def _typing(self, chunks: list[bytes]) -> Callable[[], Awaitable[None]]:
        async def type_all() -> None:
            for chunk in chunks:
                await self.device.send_input(chunk)
                self.typed += chunk  # the device took it

        return type_all

    def begin(self, round_: Round) -> list[Callable[[], Awaitable[object]]]:
        self.output.clear()
        self.delivered_before = self.device.stats.input_bytes
        rng = round_.rng
        return [self._typing([rng.randbytes(rng.randint(1, 600))
                              for _ in range(rng.randint(0, 3))])]

    async def serve(self, round_: Round, tasks: Sequence[Callable[[], Awaitable[object]]]
                    ) -> DeviceNeedsReset | None:
        return await run_until_idle(self.device, round_.context, tasks)

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        sent = [p.readable_bytes(round_.snapshot) for p in round_.reached(TRANSMIT)
                if not p.stops]
        assert b"".join(self.output) == b"".join(sent), "console output is not what was sent"
        received = round_.reached(RECEIVE)
        delivered = self.device.stats.input_bytes
        pushes = round_.guest.queues[RECEIVE].pushes
        assert sum(written for _, written in pushes) == delivered - self.delivered_before
        if not any(p.unreliable for p in received):
            plans = {p.head: p for p in received}
            data = b"".join(plans[head].writable_bytes(round_.memory.data, written)
                            for head, written in pushes)
            assert data == self.typed[self.delivered_before:delivered], (
                "console input reached the guest out of order or changed")

    def reset(self) -> None:
        self.device.reset()

    async def check_after_reset(self, guest: FuzzGuest, rng: random.Random) -> None:
        self.output.clear()
        held = bytes(self.typed[self.device.stats.input_bytes:])
        typed = rng.randbytes(rng.randint(1, 200))
        text = rng.randbytes(rng.randint(1, 200))
        room = max(len(held), len(typed))
        round_ = new_round(self, guest, rng, sizes=(16, 32))
        await well_formed_round(
            self, round_,
            [(RECEIVE, Request([], split_length(rng, room))),
             (RECEIVE, Request([], split_length(rng, room))),
             (TRANSMIT, Request(split(rng, text), []))],
            lambda _: [self._typing([typed])])
        assert b"".join(self.output) == text
        plans = {p.head: p for p in round_.writers[RECEIVE].plans}
        data = b"".join(plans[head].writable_bytes(round_.memory.data, written)
                        for head, written in guest.queues[RECEIVE].pushes)
        assert data == held + typed, "console input after a reset"


def test_hostile_driver(fuzz_report: Callable[[str], None]) -> None:
    """At least 10,000 ring- and descriptor-level hostile chains on the receive and
    transmit queues while input is typed: the device only ever stops with
    DeviceNeedsReset where it must, passes on exactly what it was given, never writes
    outside the writable buffers it was given, and works after each reset."""
    tally = fuzz(ConsoleTarget(), EPISODES)
    fuzz_report(tally.line())
    assert tally.hostile >= HOSTILE_TARGET, tally.line()
