"""Eventfds as the data path uses them: a kick to wait for, a notification to send."""

from __future__ import annotations

import os

import trio


def signal_eventfd(fd: int) -> None:
    """Add 1 to the eventfd's counter. Never raises: a saturated counter means the peer
    has a notification pending anyway, and a closed fd means it is going away."""
    if fd < 0:
        return
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass


async def wait_eventfd(fd: int) -> None:
    """Wait until the (non-blocking) eventfd's counter is non-zero, and consume it: all
    notifications that arrived since the last call count as one."""
    while True:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()
            return
