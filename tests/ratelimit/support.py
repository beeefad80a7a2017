"""Helpers shared by the rate-limit tests and the tests that carry limits elsewhere
(snapshots, migration)."""

from __future__ import annotations

import trio


async def admits(device: object, count: int, timeout_s: float = 60) -> None:
    """Wait until ``device``'s limiter has admitted ``count`` requests: the limiter is the
    one serving the device, and the guest is getting through it."""
    throttle = device.throttle  # type: ignore[attr-defined]
    assert throttle is not None
    with trio.fail_after(timeout_s):
        while throttle.admitted_ops < count:
            await trio.sleep(0.02)
