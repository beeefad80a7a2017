"""The worker spawner (:mod:`avmm.isolation.spawner`) against workers that misbehave: a
jailed process that outlives its reaper (its parent-death signal reset) is killed, one
slow to die does not hold the spawner up and is reaped later, and workers started as
fresh interpreters are reaped by the spawner alone. Test-only workers
(tests/isolation/orphan_worker.py) stand for the reaper and the jailed process: no
root, no jail, no VM."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from avmm.isolation import spawner as spawner_module
from avmm.isolation.spawner import Spawner

ROOT = str(Path(__file__).resolve().parents[2])


def _proc_state(pid: int) -> str | None:
    """The process's state letter ("Z": a zombie), None once it is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@contextlib.asynccontextmanager
async def _spawner(**settings: Any) -> AsyncIterator[Spawner]:
    spawner = Spawner(worker_module="tests.isolation.orphan_worker", module_path=ROOT,
                      **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(spawner.run)
        try:
            yield spawner
        finally:
            nursery.cancel_scope.cancel()


async def _start(spawner: Spawner) -> tuple[int, trio.socket.SocketType]:
    """A test worker; its reaper's PID and the test's end of its channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid, log_fd = await spawner.spawn(theirs.fileno())
    finally:
        theirs.close()
    os.close(log_fd)
    return pid, trio.socket.from_stdlib_socket(ours)


@contextlib.contextmanager
def _killed_at_the_end(pid: int) -> Iterator[None]:
    """A process the test made, killed if it is still running at the end (a failing
    test must not leave it behind)."""
    try:
        yield
    finally:
        if _proc_state(pid) not in (None, "Z"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


async def test_a_jailed_process_that_reset_its_death_signal_dies_with_its_reaper() -> None:
    """A hostile jailed process resets its parent-death signal: when its reaper is
    killed it is orphaned to the spawner, alive. The spawner kills it before it reports
    the worker's end: an ended worker leaves nothing running."""
    async with _spawner() as spawner:
        reaper, channel = await _start(spawner)
        with channel:
            await channel.send(b"o")
            orphan = int(await channel.recv(32))
            with _killed_at_the_end(orphan):
                assert _proc_state(orphan) in ("S", "R")
                await spawner.kill(reaper)
                with trio.fail_after(30):
                    assert await spawner.wait(reaper) == -signal.SIGKILL
                # Dead, and still holding its PID until the daemon lets go.
                assert _proc_state(orphan) == "Z"
                assert _proc_state(reaper) == "Z"
                await spawner.release(reaper)
                assert _proc_state(orphan) is None
                assert _proc_state(reaper) is None


async def test_workers_started_as_fresh_interpreters_are_reaped_by_the_spawner_alone(
) -> None:
    """With fork=False each worker is a subprocess.Popen. A worker that has ended when
    the next one starts: the next Popen must not reap it behind the spawner's back (the
    spawner would find no child to report, and its PID would be free before the daemon
    let go of it). The spawner is stopped while the first ends and the second start is
    asked for, so that it sees both at once."""
    async with _spawner(fork=False) as spawner:
        assert spawner._process is not None
        spawner_pid = spawner._process.pid
        first, channel = await _start(spawner)
        started: list[int] = []

        async def start_second() -> None:
            pid, second_channel = await _start(spawner)
            second_channel.close()  # it exits
            started.append(pid)

        os.kill(spawner_pid, signal.SIGSTOP)
        try:
            channel.close()  # the first worker exits 0
            with trio.fail_after(30):
                while _proc_state(first) != "Z":
                    await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_second)
                await trio.testing.wait_all_tasks_blocked()
                os.kill(spawner_pid, signal.SIGCONT)
        finally:
            os.kill(spawner_pid, signal.SIGCONT)
        with trio.fail_after(30):
            assert await spawner.wait(first) == 0
            assert await spawner.names_id(0)  # it still answers
            assert await spawner.wait(started[0]) == 0
        assert _proc_state(first) == "Z"  # its PID taken until the daemon lets go
        await spawner.release(first)
        await spawner.release(started[0])
        assert _proc_state(first) is None
        assert _proc_state(started[0]) is None


def _fork_paused(group: int = 0) -> int:
    """A child of this process that waits to be killed, in process group ``group``
    (0: its own)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, group)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    with contextlib.suppress(OSError):  # the child does it too: whoever is first
        os.setpgid(pid, group or pid)
    return pid


@pytest.mark.parametrize("released_first", [False, True])
def test_a_jailed_process_slow_to_die_holds_nothing_up_and_is_reaped_later(
        monkeypatch: pytest.MonkeyPatch, released_first: bool) -> None:
    """The spawner's bookkeeping (this process standing for the spawner): a jailed
    process that is not dead soon after its SIGKILL (one in an uninterruptible sleep,
    simulated by a SIGKILL that does not come) does not keep the spawner waiting, and
    is reaped once it has ended, whether the daemon let go of its worker before or
    after: no zombie left for good."""
    monkeypatch.setattr(spawner_module, "_ORPHAN_EXIT_S", 0.05)
    reaper = _fork_paused()
    orphan = _fork_paused(reaper)
    with _killed_at_the_end(orphan), _killed_at_the_end(reaper):
        workers = spawner_module._Workers()
        workers.started(reaper, [])
        (reaper_fd,) = workers.running
        os.kill(reaper, signal.SIGKILL)
        assert select.select([reaper_fd], [], [], 30)[0]
        sent: list[int] = []
        with monkeypatch.context() as slow:
            slow.setattr(signal, "pidfd_send_signal",
                         lambda _fd, number, *_args: sent.append(number))
            started = time.monotonic()
            assert workers.end(reaper_fd) == (reaper, -signal.SIGKILL)
            assert time.monotonic() - started < 3
        assert sent == [signal.SIGKILL]
        (lingering_fd,) = workers.lingering
        assert workers.lingering[lingering_fd] == (orphan, reaper)
        assert lingering_fd in workers.fds()  # no worker inherits it
        if released_first:
            workers.release(reaper)
            assert _proc_state(reaper) is None
        os.kill(orphan, signal.SIGKILL)  # it dies at last
        events = dict(workers.poller.poll(30_000))
        assert lingering_fd in events
        workers.lingered(lingering_fd)
        assert workers.lingering == {}
        if not released_first:
            assert _proc_state(orphan) == "Z"  # its PID is its worker's until released
            workers.release(reaper)
        assert _proc_state(orphan) is None
        assert _proc_state(reaper) is None
