"""The test guest's ``mem-walk`` with ``avmm.rate=K`` (tests/guest/README.md, "mem-walk"):
the rounds' rewrites dirty at most K KiB per second, watched from the host in guest RAM,
and the output lines stay the model's (tests/state/mem_walk.py).

Only bounds that load cannot break are asserted: a busy host slows the guest down, it
never makes it write faster than its pacing allows. The guest's clock is its TSC at the
rate CPUID suggests (tests/guest/timer.c), so the bounds leave room for a guess that is
somewhat off.
"""

from __future__ import annotations

import time

import pytest
import trio

from avmm import StopReason, VirtualMachine
from tests.state.mem_walk import (
    GOLDEN,
    MASK64,
    PAGE,
    PAGE_WORDS,
    PREFIX,
    STRIDE,
    expected_lines,
    mem_walk_lines,
)
from tests.virtio_guest_support import splitmix64
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

BASE = 0x400000
MIB, ROUNDS, SEED = 4, 2, 5
RATE_KIB_S = 512  # 128 pages a second: round 1's 256 pages take 2 s
PAGES_PER_S = RATE_KIB_S * 1024 / PAGE
#: Room for a guest whose TSC rate guess is off (and for the host's polling).
SLACK = 1.3
POLL_S = 0.02
TIMEOUT_S = 120


def first_word(generation: int, page: int) -> int:
    """Word 0 of ``page`` as round ``generation`` writes it (the guest writes it first)."""
    return splitmix64((SEED * GOLDEN + (generation << 48) + page * PAGE_WORDS) & MASK64)


async def test_mem_walk_rate_caps_the_pages_a_round_dirties_per_second() -> None:
    pages = [p for p in range(MIB * (1 << 20) // PAGE) if p % STRIDE == 1]  # round 1's
    round_one = {p: first_word(1, p) for p in pages}
    config = guest_config(f"avmm.test=mem-walk avmm.mib={MIB} avmm.rounds={ROUNDS} "
                          f"avmm.seed={SEED} avmm.rate={RATE_KIB_S}", memory_mib=16)
    samples: list[tuple[float, int]] = []  # (host time, pages of round 1 written)
    output = bytearray()
    async with VirtualMachine(config) as vm:
        memory = vm.memory
        assert memory is not None

        def written() -> int:
            return sum(memory.read_u64(BASE + p * PAGE) == word for p, word in round_one.items())

        async def collect() -> None:
            async for chunk in vm.serial:
                output.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            with trio.fail_after(TIMEOUT_S):
                while not samples or samples[-1][1] < len(pages):
                    before = time.monotonic()
                    count = written()
                    # The reading took time too: stamp it at its start for the cap (the
                    # later pages it counted came after) and keep only settled windows.
                    samples.append((before, count))
                    await trio.sleep(POLL_S)
            result = await vm.wait()
    assert mem_walk_lines(output.decode()) == expected_lines(MIB, ROUNDS, seed=SEED)
    assert result.reason is StopReason.RESET
    started = next(i for i, (_, count) in enumerate(samples) if count > 0)
    # The writes of round 1 took at least as long as the rate allows (the first page is
    # free: the schedule starts when the round does)...
    seconds = samples[-1][0] - samples[started - 1][0] if started else samples[-1][0]
    assert seconds * PAGES_PER_S * SLACK >= len(pages) - 1, (seconds, len(pages))
    # ... and no window between two readings saw more than its share (plus the page the
    # schedule lets through at once, and one for a reading that straddled a write).
    for (t0, c0), (t1, c1) in zip(samples[started:], samples[started + 1:], strict=False):
        assert c1 - c0 <= (t1 - t0 + POLL_S) * PAGES_PER_S * SLACK + 2, (t1 - t0, c1 - c0)


async def test_a_rate_beyond_any_memory_bus_is_a_panic() -> None:
    config = guest_config("avmm.test=mem-walk avmm.mib=1 avmm.rate=0x100000000",
                          memory_mib=16)
    async with VirtualMachine(config) as vm:
        output = bytearray()
        async for chunk in vm.serial:
            output += chunk
        await vm.wait()
    assert f"{PREFIX}panic: avmm.rate: must be below {1 << 32} KiB/s" in output.decode()
    assert not mem_walk_lines(output.decode())
