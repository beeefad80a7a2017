"""A worker program for tests only (``Spawner(worker_module=...)``): avmm's worker plus
one request, ``trip``, that makes a call the worker's seccomp filter forbids (execve, on
the event-loop thread), so that a test sees a real SIGSYS kill, not one sent by hand
(PID 1 of a PID namespace ignores a SIGSYS sent from outside: it has no handler); and a
``snapshot`` that starts :data:`SNAPSHOT_DELAY_S` late, so that a test can kill the
worker, or let the daemon's timeout pass, while the daemon waits for it; and a
``take_taps`` that makes the taps it was handed persistent and its own (what a worker
whose filter is off or in log mode could do); and a ``drop_death_signal`` that resets the
jailed process's parent-death signal, so that it outlives its reaper."""

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
        if op == "drop_death_signal":
            # What a jailed process a guest took over can do: outlive its reaper.
            from avmm.isolation.jail import PR_SET_PDEATHSIG, _prctl
            _prctl(PR_SET_PDEATHSIG, 0, "resetting the parent-death signal")
            assert self.hosted is not None
            return worker.status(self.hosted)
        if op == "take_taps":
            assert self.hosted is not None
            return {**worker.status(self.hosted), "taps": _take_taps()}
        return await super()._do(op, message, fds)


def _take_taps() -> list[str]:
    """What a worker whose filter is off (or in log mode) can do to the taps it was
    handed: attach it to another tap (TUNSETIFF: EEXIST, it is attached already), make
    it persistent and its own (its uid and gid). The outcome of each call, per tap, for
    the test."""
    import fcntl
    import struct

    from avmm.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF

    tunsetpersist, tunsetowner, tunsetgroup = 0x400454CB, 0x400454CC, 0x400454CE
    results = []
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "/dev/net/tun":
                continue
        except OSError:
            continue
        attach = struct.pack("=16sH22x", b"avmmother0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        for request, argument in ((TUNSETIFF, attach), (tunsetpersist, 1),
                                  (tunsetowner, os.getuid()), (tunsetgroup, os.getgid())):
            try:
                fcntl.ioctl(fd, request, argument)
                results.append("ok")
            except OSError as e:
                results.append(os.strerror(e.errno or 0))
    return results


def run_worker(channel_fd: int) -> int:
    worker._Worker = _TripWorker  # type: ignore[misc]
    return worker.run_worker(channel_fd)
