"""avmm.concurrency.run_together: the one helper the migration source and the virtio
devices share (they had a copy each): the first failure cancels the other tasks and
surfaces as itself; a preferred type wins when several fail; several others stay a
group."""

from __future__ import annotations

import pytest
import trio

from avmm.concurrency import run_together
from avmm.virtio.device import DeviceNeedsReset
from avmm.virtio.device import run_together as device_run_together


class Boom(Exception):
    pass


async def test_tasks_that_finish_return() -> None:
    done: list[str] = []

    async def task(name: str) -> None:
        await trio.sleep(0)
        done.append(name)

    await run_together(lambda: task("a"), lambda: task("b"))
    assert sorted(done) == ["a", "b"]


async def test_one_failure_cancels_the_others_and_surfaces_as_itself() -> None:
    cancelled = trio.Event()

    async def sleeper() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def fails() -> None:
        await trio.sleep(0)
        raise Boom("one line")

    with pytest.raises(Boom, match="one line") as caught:
        await run_together(sleeper, fails)
    assert cancelled.is_set()
    assert caught.value.__suppress_context__


async def test_several_failures_stay_a_group_unless_one_is_preferred() -> None:
    async def fails(error: Exception) -> None:
        raise error

    with pytest.raises(BaseExceptionGroup):
        await run_together(lambda: fails(Boom("a")), lambda: fails(ValueError("b")))
    with pytest.raises(ValueError, match="b"):
        await run_together(lambda: fails(Boom("a")), lambda: fails(ValueError("b")),
                           prefer=(ValueError,))


async def test_a_device_prefers_a_reset_to_other_errors() -> None:
    async def fails(error: Exception) -> None:
        raise error

    with pytest.raises(DeviceNeedsReset):
        await device_run_together(lambda: fails(Boom("a")),
                                  lambda: fails(DeviceNeedsReset("ring broken")))
    with pytest.raises(Boom):
        await device_run_together(lambda: fails(Boom("a")), trio.sleep_forever)
