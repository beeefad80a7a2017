"""The one thread of ``avmm serve`` that may make IP sockets (issue 14).

A migration over TCP can be asked for at any time, and a loaded seccomp filter can never
be widened; but a filter is per thread, and filters stack. So ``avmm serve`` loads its
filters in this order, on the event-loop thread, before it serves its first request
(:func:`install_daemon_filters`):

1. the process filter, on every thread (TSYNC): the union of what the daemon's threads
   need, IP sockets included;
2. this module's thread, started then, which stacks the small
   :data:`~avmm.isolation.syscalls.IP_SOCKETS` filter on itself (make, bind and listen
   TCP sockets; resolve host names) and then runs, one at a time, the calls handed to
   it through a queue;
3. the daemon's own filter, stacked on the event-loop thread only, which refuses
   ``socket()`` for AF_INET/AF_INET6. Every thread the loop starts from then on (trio's
   helpers, vCPU and I/O threads) inherits it, and trio's helper threads that existed
   before are made to load it too (:func:`_narrow_idle_helpers`).

The sockets come back to their caller as fds and are used like any other: a
non-blocking connect, accept4 and the stream calls act on an existing fd, which the
event loop's filter allows. The thread lives as long as the process, waiting on its
queue. Without a daemon (``avmm up``, which never makes IP sockets;
a library; a test) no such thread exists, and :func:`call` runs the call in place.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import structlog
import trio

from .seccomp import (
    DAEMON_PROCESS_KINDS,
    SeccompMode,
    install_process_filter,
    install_thread_filter,
)
from .syscalls import ThreadKind

log = structlog.get_logger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]

#: The running thread's job queue, or None (no thread: calls run in place).
_jobs: queue.SimpleQueue[_Job] | None = None
_lock = threading.Lock()


def call(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on the IP-socket thread if there is one, else here; blocks
    (call it from a helper thread, never the event loop: see :func:`run`)."""
    jobs = _jobs
    if jobs is None:
        return function(*args)
    results: queue.SimpleQueue[outcome.Outcome[T]] = queue.SimpleQueue()
    jobs.put((functools.partial(function, *args), results.put))
    return results.get().unwrap()


async def run(function: Callable[..., T], *args: Any,
              abandon_on_cancel: bool = False) -> T:
    """:func:`call` from the event loop: a helper thread waits for the answer (calls run
    one at a time, so a slow one, such as a DNS lookup, delays the next).
    ``abandon_on_cancel``: a cancelled caller returns at once and the answer is dropped
    (only for what holds nothing to release, such as a lookup's addresses)."""
    return await trio.to_thread.run_sync(call, function, *args,
                                         abandon_on_cancel=abandon_on_cancel)


def start(mode: SeccompMode) -> None:
    """Start the IP-socket thread (once per process) and wait until its filter is
    loaded. Call it after the process filter and before the event loop's own.

    :raises SeccompError: its filter could not be loaded (no thread is left running).
    """
    global _jobs
    # A host name is encoded with the idna codec, imported on first use: files opened
    # (and a TCGETS ioctl) that the thread's filter refuses. Import it now.
    import encodings.idna  # noqa: F401

    with _lock:
        if _jobs is not None:
            return
        jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

        def serve() -> None:
            try:
                install_thread_filter(ThreadKind.IP_SOCKETS, mode)
            except BaseException as e:
                ready.put(e)
                return
            ready.put(None)
            while True:
                function, deliver = jobs.get()
                deliver(outcome.capture(function))

        thread = threading.Thread(target=serve, name="avmm ip sockets", daemon=True)
        thread.start()
        error = ready.get()
        if error is not None:
            thread.join()
            raise error
        _jobs = jobs


def install_daemon_filters(mode: SeccompMode) -> None:
    """``avmm serve``'s filters, in the order the module docstring gives; on the
    event-loop thread (it blocks while the filters are built, before the first request
    is served). Nothing in mode off (install_process_filter says so)."""
    install_process_filter(DAEMON_PROCESS_KINDS, mode)
    if mode is SeccompMode.OFF:
        return
    start(mode)
    install_thread_filter(ThreadKind.DAEMON, mode, rename=False)
    _narrow_idle_helpers(mode)


def _narrow_idle_helpers(mode: SeccompMode) -> None:
    """Load the daemon's filter on trio's helper threads that were started before the
    event loop loaded it (they wait in trio's thread cache for the next
    ``to_thread`` job, which could otherwise make an IP socket).

    One job per other thread of the process, all handed out before any may finish: trio
    gives each to an idle helper while it has one, and starts new threads (from the
    event loop: already filtered, they load it a second time, harmlessly) for the rest;
    so every idle helper gets one. Threads that are not trio's helpers (the IP-socket
    thread itself) get none."""
    others = len(os.listdir("/proc/self/task")) - 1
    loaded = threading.Semaphore(0)
    release = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            install_thread_filter(ThreadKind.DAEMON, mode, rename=False)
        except BaseException as e:
            errors.append(e)
        finally:
            loaded.release()
        release.wait()

    for _ in range(others):
        trio.lowlevel.start_thread_soon(load, lambda _result: None,
                                        name="avmm filter helper")
    for _ in range(others):
        loaded.acquire()
    release.set()
    if errors:
        raise errors[0]
    log.debug("daemon filter loaded on the event loop's helper threads", threads=others)
