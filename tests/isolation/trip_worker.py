"""A worker program for tests only (``Spawner(worker_module=...)``): avmm's worker plus
one request, ``trip``, that makes a call the worker's seccomp filter forbids (execve, on
the event-loop thread), so that a test sees a real SIGSYS kill, not one sent by hand
(PID 1 of a PID namespace ignores a SIGSYS sent from outside: it has no handler)."""

from __future__ import annotations

import os
from typing import Any

from avmm.isolation import worker


class _TripWorker(worker._Worker):
    async def _do(self, op: object, message: dict[str, Any], fds: list[int]) -> Any:
        if op == "trip":
            os.execv("/bin/true", ["true"])
        return await super()._do(op, message, fds)


def run_worker(channel_fd: int) -> int:
    worker._Worker = _TripWorker  # type: ignore[misc]
    return worker.run_worker(channel_fd)
