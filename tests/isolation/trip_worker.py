"""A worker program for tests only (``Spawner(worker_module=...)``): avmm's worker plus
one request, ``trip``, that makes a call the worker's seccomp filter forbids (execve, on
the event-loop thread), so that a test sees a real SIGSYS kill, not one sent by hand
(PID 1 of a PID namespace ignores a SIGSYS sent from outside: it has no handler); and a
``snapshot`` that starts :data:`SNAPSHOT_DELAY_S` late, so that a test can kill the
worker, or let the daemon's timeout pass, while the daemon waits for it."""

from __future__ import annotations

import os
from typing import Any

import trio

from avmm.isolation import worker

#: How long the snapshot request waits, holding the two files, before it writes them.
SNAPSHOT_DELAY_S = 5.0


class _TripWorker(worker._Worker):
    async def _do(self, op: object, message: dict[str, Any], fds: list[int]) -> Any:
        if op == "trip":
            os.execv("/bin/true", ["true"])
        if op == "snapshot":
            await trio.sleep(SNAPSHOT_DELAY_S)
        return await super()._do(op, message, fds)


def run_worker(channel_fd: int) -> int:
    worker._Worker = _TripWorker  # type: ignore[misc]
    return worker.run_worker(channel_fd)
