"""Running a long-lived blocking loop (a vCPU, a disk's I/O thread) in a thread that
belongs to a trio task.

``trio.to_thread.run_sync`` cannot interrupt its thread and counts against trio's default
thread limiter (40), which would cap how many VMs a process can hold. Instead each loop
gets its own thread from :func:`trio.lowlevel.start_thread_soon`, and the task that owns
it waits for the thread with an abort function that tells the loop to stop (a vCPU is
*kicked* out of KVM_RUN; an I/O thread is woken): when the task is cancelled the loop
returns, and only then does the task finish. So cancelling a VM's nursery always joins
every such thread; nothing is left running.

A loop that runs under a seccomp filter of its own (``seccomp_kind``, when a process
filter is loaded: see :mod:`avmm.isolation.seccomp`) gets a dedicated thread instead of
one from trio's cache: a filter stays with its thread until the thread exits, and a cached
thread would carry a vCPU's allow-list into the next ``to_thread`` job. So does a loop
whose thread the VM changes for good (``dedicated``: a vCPU's, which may be pinned to
host CPUs and put in the VM's cgroup): returned to the cache, it would run the next
``to_thread`` job, and the processes that job starts, pinned and throttled as the VM was.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable, Collection
from typing import TypeVar

import outcome
import trio

from .isolation.seccomp import SeccompMode, install_thread_filter, thread_filter_mode
from .isolation.syscalls import ThreadKind

T = TypeVar("T")

#: How long CPython lets a thread keep the GIL while another waits for it, in a process
#: that holds many VMs (``avmm serve --isolation none``); CPython's default is 5 ms. A
#: quiet VM's disk I/O thread otherwise waits up to that long behind a busy VM's, per
#: request: in ``make bench``'s noisy-neighbour figures (test guest, qd 1 reads next to
#: an unlimited neighbour at qd 32, one daemon) 0.5 ms took the quiet VM from 2.9k to
#: 8.1k requests/s and its median latency from 158 to 21 µs (3 runs each, 2 cores).
DENSE_SWITCH_INTERVAL_S = 0.0005


def share_the_interpreter_between_vms() -> float:
    """Set :data:`DENSE_SWITCH_INTERVAL_S` as this process's GIL switch interval (it is
    the whole process's: the daemon's, not a library's choice, so an embedder calls it
    itself if it wants it); the interval it had before."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(DENSE_SWITCH_INTERVAL_S)
    return before


async def run_in_own_thread(
    function: Callable[[], T], *, on_cancel: Callable[[], None], name: str,
    seccomp_kind: ThreadKind | None = None, seccomp_fds: Collection[int] | None = None,
    dedicated: bool = False,
) -> T:
    """Run ``function`` in a new thread and return its result (or raise its exception).

    If the calling task is cancelled, ``on_cancel`` is called (from the event-loop thread;
    it must make ``function`` return soon) and the task keeps waiting until ``function``
    returns; then Cancelled is raised.

    With ``seccomp_kind``, the thread loads that kind's filter before ``function`` runs
    (when this process loaded a process filter; see :mod:`avmm.isolation.seccomp`),
    with ``seccomp_fds``: allowing its fd-taking data calls on those fds only (the fds
    ``function`` owns; :data:`avmm.isolation.syscalls.FD_CALLS`).
    With ``dedicated`` (or a filter), the thread is a new one that ends with
    ``function``, never one of trio's cached threads (module docstring).
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    context = contextvars.copy_context()  # keep structlog's bound vm/vcpu/device

    def deliver(result: outcome.Outcome[T]) -> None:
        def wake() -> None:
            trio.lowlevel.reschedule(task, result)

        try:
            token.run_sync_soon(wake)
        except trio.RunFinishedError:  # pragma: no cover - the loop is gone already
            pass

    filtered = seccomp_kind is not None and thread_filter_mode() is not SeccompMode.OFF

    def body() -> T:
        if filtered:
            assert seccomp_kind is not None
            install_thread_filter(seccomp_kind, fds=seccomp_fds)
        return context.run(function)

    if filtered or dedicated:
        # Not from trio's cache: what was done to this thread (its filter, affinity,
        # cgroup) must die with it (module docstring).
        threading.Thread(target=lambda: deliver(outcome.capture(body)), name=name,
                         daemon=True).start()
    else:
        trio.lowlevel.start_thread_soon(body, deliver, name=name)

    def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
        on_cancel()
        return trio.lowlevel.Abort.FAILED

    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    # If we were cancelled while waiting, surface it now that the thread has finished.
    await trio.lowlevel.checkpoint_if_cancelled()
    return result
