"""The process that starts ``avmm serve``'s VM workers (``--isolation process``).

A seccomp filter is inherited by every process its process starts, and a worker must
still unshare, mount and pivot into its jail before it loads its own filter. So the
daemon cannot start workers itself once it has loaded its filter (which forbids execve,
fork and kill anyway). Before it does, it starts this small process
(``python -m avmm.isolation.spawner --fd N``), and from then on asks it, over a
SOCK_SEQPACKET socketpair, to start a worker (the worker's end of its private channel
travels with the request, SCM_RIGHTS) or to kill one. The spawner reports each
worker's end (its exit status) when it happens, and reaps what is left of the worker
only once the daemon releases it (its PIDs stay taken until then: see ``_Workers``).

It runs no guest code and parses only the daemon's requests (one JSON object each, a
fixed shape); when the daemon goes away it kills its workers and exits.

It also keeps a copy of each tap fd a worker is handed, with the tap's state before the
worker had it, and puts the tap back as it was once the worker has ended, however it
ended (:mod:`avmm.isolation.taps`): a worker could make a tap persistent or change its
owner.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import importlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from ..errors import AvmmError
from .channel import close_fds
from .jail import become_child_subreaper, nss_names_id
from .taps import HeldTap

log = structlog.get_logger(__name__)

_MAX_REQUEST = 16384
#: The most taps a spawn request may carry (one per NIC; ``net[0]`` to ``net[99]``).
MAX_TAPS = 100
_NETNS_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The program a worker runs (its ``run_worker(channel_fd)``). Tests give another one
#: (tests/isolation/trip_worker.py); the daemon never does.
WORKER_MODULE = "avmm.isolation.worker"


class SpawnerError(AvmmError):
    """The worker spawner failed or went away."""


# -- the spawner process -------------------------------------------------------------------

def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, ancillary, flags, _ = sock.recvmsg(_MAX_REQUEST,
                                             socket.CMSG_SPACE(4 * (1 + MAX_TAPS)))
    fds: list[int] = []
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
    if not data:
        return None, fds
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return {}, fds
    try:
        message = json.loads(data)
    except ValueError:
        return {}, fds
    return (message if isinstance(message, dict) else {}), fds


def _send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps(message).encode()], ancillary)


def _start_worker(channel_fd: int, module: str, fork: bool, closing: list[int]
                  ) -> tuple[int, int, subprocess.Popen[bytes] | None]:
    """A worker (``module``'s ``run_worker``) on ``channel_fd``: forked from here (the
    VMM's modules are loaded already) or a fresh interpreter; its PID, the read end of
    a pipe that is its stderr (its stdin and stdout are /dev/null): the daemon relays
    what it logs, marked as the worker's, never on its own stderr unmarked; and for a
    fresh interpreter its Popen, which the caller keeps until it has reaped the worker
    itself (see :meth:`_Workers.started`)."""
    log_read, log_write = os.pipe2(os.O_CLOEXEC)
    popen: subprocess.Popen[bytes] | None = None
    try:
        if not fork:
            # A worker module outside avmm (tests) is found as the spawner found it.
            python_path = os.environ.get("PYTHONPATH")
            popen = subprocess.Popen(
                [sys.executable, "-m", module, "--channel-fd", str(channel_fd)],
                pass_fds=(channel_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log_write, cwd="/", process_group=0, env={
                    "PATH": os.defpath,
                    **({"PYTHONPATH": python_path} if python_path else {})})
            pid = popen.pid
        else:
            pid = _fork_worker(channel_fd, module, [*closing, log_read], log_write)
            with contextlib.suppress(OSError):  # the child does it too: whoever is first
                os.setpgid(pid, pid)
    except BaseException:
        os.close(log_read)
        raise
    finally:
        os.close(log_write)
    return pid, log_read, popen


def _fork_worker(channel_fd: int, module: str, closing: list[int], log_write: int) -> int:
    run_worker = importlib.import_module(module).run_worker
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        # A process group of its own, which the jailed process under it inherits: how
        # this process finds that one once it is an orphan here (see _Workers).
        os.setpgid(0, 0)
        for fd in closing:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_write, 2)
        os.close(null)
        os.close(log_write)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir("/")
        os.environ.clear()
        os.environ["PATH"] = os.defpath
        code = run_worker(channel_fd)
    except BaseException:
        # Nothing above this frame may run in the child (it is a copy of the spawner).
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def serve(sock: socket.socket, *, module: str = WORKER_MODULE, fork: bool = True) -> None:
    """Answer the daemon until it closes its end. ``fork``: workers are forked from
    this process (see :func:`main`), else each is a fresh interpreter."""
    if fork:
        # Loaded once here, so that a forked worker starts with them (imports are most
        # of a fresh worker's start-up).
        importlib.import_module(module)
    # The jailed process under each worker's reaper is orphaned here when the reaper
    # ends (see _Workers).
    become_child_subreaper()
    _send(sock, {"event": "ready"})
    workers = _Workers()
    try:
        _serve(sock, workers, module, fork)
    finally:
        workers.close()


class _Workers:
    """The workers this process started, their taps, and what is left of them.

    Why a worker's processes are not reaped at once: the daemon reads the PID of the
    jailed process (the reaper's child) and writes it into its VM's cgroup. A PID is
    free for another process only once its process has been reaped, so the daemon's
    numbers stay those of its worker exactly as long as nothing reaps them: the reaper
    never reaps the jailed process (waitid WNOWAIT, see avmm.isolation.jail._reap), and
    when the reaper ends, its child (dead or dying of its parent-death signal) is
    orphaned to this process, a child subreaper, which holds both as zombies after
    telling the daemon how the worker ended, until the daemon says it is done with
    their PIDs (``release``). The jailed process is found by its process group, the
    reaper's (its filter lets it call neither setpgid nor setsid).

    A jailed process that outlives its reaper is SIGKILLed (one a guest took over may
    have reset its parent-death signal); one that is not dead after a short wait
    (:data:`_ORPHAN_EXIT_S`: it may be in an uninterruptible sleep) does not hold up
    the spawner: its pidfd joins the poll (``lingering``), and it is reaped once it has
    ended and its worker is released.

    A worker started as a fresh interpreter has a :class:`subprocess.Popen`, kept (with
    a return code set before it is dropped) until this process has reaped the worker
    itself: a Popen dropped unfinished is queued by CPython, and reaped by the next
    Popen, behind this class's back."""

    def __init__(self) -> None:
        self.poller = select.poll()
        #: pidfd → pid, of the reapers that have not ended.
        self.running: dict[int, int] = {}
        #: Reaper pid → its taps, held (see avmm.isolation.taps).
        self.taps: dict[int, list[HeldTap]] = {}
        #: Reapers that have ended and are not reaped yet, and those the daemon let go
        #: of before they ended (reaped as soon as they end).
        self.ended: set[int] = set()
        self.released: set[int] = set()
        #: pidfd → (pid, its worker's reaper pid), of jailed processes SIGKILLed when
        #: their reaper ended that had not ended after :data:`_ORPHAN_EXIT_S`.
        self.lingering: dict[int, tuple[int, int]] = {}
        #: Reaper pid → its Popen (a fresh interpreter's), until reaped here.
        self.popens: dict[int, subprocess.Popen[bytes]] = {}

    def started(self, pid: int, taps: list[HeldTap],
                popen: subprocess.Popen[bytes] | None = None) -> None:
        if popen is not None:
            self.popens[pid] = popen
        pidfd = os.pidfd_open(pid)
        self.running[pidfd] = pid
        self.taps[pid] = taps
        self.poller.register(pidfd, select.POLLIN)

    def fds(self) -> list[int]:
        """What a new worker must not inherit."""
        return [*self.running, *self.lingering,
                *(tap.fd for held in self.taps.values() for tap in held)]

    def end(self, pidfd: int) -> tuple[int, int]:
        """The reaper of ``pidfd`` has ended: kill the jailed process it leaves here and
        wait (briefly) for its end, put its taps back; its PID and exit status (as
        subprocess gives it). Both stay unreaped (see the class)."""
        pid = self.running.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        try:
            ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            ended = None
        if ended is None:
            # Reaped by something else than this class: a bug, never a reason to end
            # the spawner (and every worker with it). How it ended is not known.
            log.error("a worker's reaper was reaped behind the spawner's back", pid=pid)
            status = -signal.SIGKILL
        else:
            status = -ended.si_status if ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED) \
                else ended.si_status
        self._kill_orphans(pid)
        for tap in self.taps.pop(pid, []):
            tap.restore()
        self.ended.add(pid)
        if pid in self.released:
            self.release(pid)
        return pid, status

    def _kill_orphans(self, group: int) -> None:
        """SIGKILL the processes of worker ``group`` orphaned here (its jailed process,
        dead, dying of its parent-death signal, or alive if it reset that), and wait up
        to :data:`_ORPHAN_EXIT_S` for their ends; those still alive then linger."""
        waiting: dict[int, int] = {}
        known = {orphan for orphan, _ in self.lingering.values()}
        for orphan in _group_children(group):
            if orphan in known:
                continue
            try:
                orphan_fd = os.pidfd_open(orphan)
            except OSError:
                continue  # reaped meanwhile (it was not this process's child any more)
            # An unreaped child of this process: the pidfd is the process read above.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(orphan_fd, signal.SIGKILL)
            waiting[orphan_fd] = orphan
        if not waiting:
            return
        poller = select.poll()
        for orphan_fd in waiting:
            poller.register(orphan_fd, select.POLLIN)
        deadline = time.monotonic() + _ORPHAN_EXIT_S
        pending = set(waiting)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for orphan_fd, _events in poller.poll(remaining * 1000):
                pending.discard(orphan_fd)
                poller.unregister(orphan_fd)
        for orphan_fd, orphan in waiting.items():
            if orphan_fd in pending:
                log.warning("a worker's jailed process is not dead yet after SIGKILL; it "
                            "is reaped once it is", pid=orphan, worker=group)
                self.lingering[orphan_fd] = (orphan, group)
                self.poller.register(orphan_fd, select.POLLIN)
            else:
                os.close(orphan_fd)

    def lingered(self, pidfd: int) -> None:
        """A lingering jailed process (see :meth:`_kill_orphans`) has ended: reaped now
        if its worker is released already, else with its worker's release."""
        orphan, group = self.lingering.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        if group not in self.ended:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, orphan, os.WEXITED | os.WNOHANG)

    def release(self, pid: int) -> None:
        """The daemon uses the PIDs of worker ``pid`` no more: reap what is left of it
        (now, or once it has ended)."""
        if pid not in self.ended:
            if pid in self.running.values():
                self.released.add(pid)
            return
        self.ended.discard(pid)
        self.released.discard(pid)
        try:
            _, wait_status = os.waitpid(pid, 0)
        except ChildProcessError:
            log.error("a worker's reaper was reaped behind the spawner's back", pid=pid)
            wait_status = 0
        popen = self.popens.pop(pid, None)
        if popen is not None:
            # Reaped here: a Popen without a return code would wait for it again.
            popen.returncode = os.waitstatus_to_exitcode(wait_status)
        # The jailed process, orphaned here in the reaper's process group (one still
        # lingering is reaped when it ends: see lingered()).
        with contextlib.suppress(ChildProcessError):
            while os.waitid(os.P_PGID, pid, os.WEXITED | os.WNOHANG) is not None:
                pass

    def kill(self, target: int) -> None:
        # Only a worker this process started and has not reaped, through its pidfd (a
        # PID number could be reused meanwhile): the jailed process under it dies with
        # it (its parent-death signal).
        for pidfd, pid in self.running.items():
            if pid == target:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def close(self) -> None:
        """The daemon is gone (or the loop failed): no worker outlives it, and no tap
        stays as a worker left it."""
        for pidfd, pid in list(self.running.items()):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            self.released.add(pid)
            self.end(pidfd)
        for pid in list(self.ended):
            self.release(pid)


#: How long a reaper's end waits for the jailed process it orphaned here (SIGKILLed)
#: to end, before it lets it linger (see _Workers): the spawner serves no one meanwhile.
_ORPHAN_EXIT_S = 0.5


def _group_children(group: int) -> list[int]:
    """This process's children in process group ``group``, but its leader: the jailed
    process orphaned here by its reaper (alive or not; unreaped children keep their
    PIDs, so the numbers read are theirs)."""
    found = []
    with contextlib.suppress(OSError):
        children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
        for child in map(int, children):
            if child == group:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group:  # state, ppid, pgrp
                    found.append(child)
    return found


def _serve(sock: socket.socket, workers: _Workers, module: str, fork: bool) -> None:
    workers.poller.register(sock.fileno(), select.POLLIN)
    while True:
        for fd, _events in workers.poller.poll():
            if fd in workers.lingering:
                workers.lingered(fd)
                continue
            if fd != sock.fileno():
                pid, status = workers.end(fd)
                _send(sock, {"event": "exited", "pid": pid, "status": status})
                continue
            message, fds = _receive(sock)
            if message is None:
                return
            op = message.get("op")
            request_id = message.get("id")
            namespaces = _tap_namespaces(message, len(fds) - 1) if op == "spawn" else None
            if op == "spawn" and fds and namespaces is not None:
                held: list[HeldTap] = []
                owned: set[int] = set()  # the tap fds the HeldTaps close
                try:
                    # Read before the worker has them (the daemon hands them over
                    # only once it has the answer).
                    for tap_fd, netns in zip(fds[1:], namespaces, strict=True):
                        held.append(HeldTap.take(tap_fd, netns))
                        owned.add(tap_fd)
                    pid, log_fd, popen = _start_worker(
                        fds[0], module, fork,
                        [sock.fileno(), *workers.fds(), *(tap.fd for tap in held)])
                except OSError as e:
                    for tap in held:
                        tap.restore()
                    _send(sock, {"id": request_id, "error": str(e)})
                else:
                    workers.started(pid, held, popen)
                    try:
                        _send(sock, {"id": request_id, "pid": pid}, (log_fd,))
                    finally:
                        os.close(log_fd)
                # The channel goes (the worker has its own); the taps are held (or were
                # restored, which closed them).
                for fd in fds:
                    if fd not in owned:
                        os.close(fd)
                continue
            if op == "names_id" and isinstance(message.get("number"), int) \
                    and not isinstance(message.get("number"), bool):
                # NSS here, not in the daemon: its modules (sssd, LDAP, systemd's
                # userdb) make calls the daemon's seccomp filter does not list.
                _send(sock, {"id": request_id, "known": nss_names_id(message["number"])})
            elif op in ("kill", "release") and isinstance(message.get("pid"), int):
                if op == "kill":
                    workers.kill(message["pid"])
                else:
                    workers.release(message["pid"])
                _send(sock, {"id": request_id, "pid": message["pid"]})
            else:
                _send(sock, {"id": request_id, "error": "bad request"})
            for fd in fds:
                os.close(fd)


def _tap_namespaces(message: dict[str, Any], count: int) -> list[str | None] | None:
    """A spawn request's ``taps``: the network namespace of each tap fd after the
    channel's (None: the spawner's own), or None if it is malformed."""
    namespaces = message.get("taps", [])
    if not isinstance(namespaces, list) or len(namespaces) != count or count > MAX_TAPS \
            or not all(netns is None or (isinstance(netns, str)
                                         and _NETNS_NAME.fullmatch(netns) is not None
                                         and netns not in (".", ".."))
                       for netns in namespaces):
        return None
    return namespaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avmm-spawner")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--exec", action="store_true",
                        help="start each worker as a fresh interpreter instead of forking")
    parser.add_argument("--worker-module", default=WORKER_MODULE)
    args = parser.parse_args(argv)
    # Ctrl-C at the daemon's terminal reaches the whole process group: the daemon
    # decides when this process ends, by closing its end of the socket, which its death
    # does too. Then this process exits, and the workers die with it: each reaper has a
    # parent-death signal, and each jailed process one on its reaper. (Not a
    # parent-death signal here: the daemon starts this process from a helper thread,
    # whose end would count as the parent's death.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(socket.socket(fileno=args.fd), module=args.worker_module, fork=not args.exec)
    return 0


# -- the daemon's side ---------------------------------------------------------------------


class Spawner:
    """The daemon's handle on the spawner process; :meth:`run` in a nursery of the
    daemon (started before the daemon's filter), then :meth:`spawn` and :meth:`kill`."""

    def __init__(self, *, fork: bool = True, worker_module: str = WORKER_MODULE,
                 module_path: str | None = None) -> None:
        self.fork = fork
        self.worker_module = worker_module
        #: Where a worker module outside avmm is (PYTHONPATH of the spawner; tests).
        self.module_path = module_path
        self._sock: Any = None
        self._process: trio.Process | None = None
        self._ids = iter(range(1, 1 << 62))
        self._answers: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._exits: dict[int, int] = {}
        self._exited = trio.Event()
        self._lock = trio.Lock()
        self._gone = False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "avmm.isolation.spawner", "--fd",
                 str(theirs.fileno()), "--worker-module", self.worker_module,
                 *(() if self.fork else ("--exec",))],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, cwd="/", env={
                    "PATH": os.defpath,
                    **({"PYTHONPATH": self.module_path} if self.module_path else {})})
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        try:
            ready = await self._sock.recv(_MAX_REQUEST)
            if json.loads(ready or b"{}").get("event") != "ready":
                raise SpawnerError("the worker spawner did not start")
            task_status.started()
            while True:
                try:
                    data, ancillary, _, _ = await self._sock.recvmsg(
                        _MAX_REQUEST, socket.CMSG_SPACE(4))
                except OSError:
                    data = b""
                fds: list[int] = []
                for level, kind, raw in ancillary if data else ():
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
                if not data:
                    return
                message = json.loads(data)
                message["fds"] = fds
                if "id" in message:
                    entry = self._answers.get(message["id"])
                    if entry is not None:
                        entry[1].append(message)
                        entry[0].set()
                    else:
                        close_fds(fds)
                elif message.get("event") == "exited":
                    self._exits[int(message["pid"])] = int(message["status"])
                    self._exited.set()
                    self._exited = trio.Event()
        finally:
            self._gone = True
            self._exited.set()
            for done, _ in self._answers.values():
                done.set()
            self._sock.close()
            with trio.CancelScope(shield=True):
                await self._process.wait()

    async def _ask(self, message: dict[str, Any], fds: tuple[int, ...] = ()
                   ) -> dict[str, Any]:
        if self._sock is None or self._gone:
            raise SpawnerError("the worker spawner is not running")
        request_id = next(self._ids)
        done = trio.Event()
        slot: list[dict[str, Any]] = []
        self._answers[request_id] = (done, slot)
        try:
            data = json.dumps({"id": request_id, **message}).encode()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
                if fds else []
            async with self._lock:
                await self._sock.sendmsg([data], ancillary)
            await done.wait()
        except OSError as e:
            raise SpawnerError(f"the worker spawner is gone: {e.strerror}") from None
        finally:
            self._answers.pop(request_id, None)
        if not slot:
            raise SpawnerError("the worker spawner is gone")
        if "error" in slot[0]:
            close_fds(slot[0].get("fds", []))
            raise SpawnerError(f"cannot start a worker: {slot[0]['error']}")
        return slot[0]

    async def spawn(self, channel_fd: int, taps: Sequence[tuple[int, str | None]] = (),
                    ) -> tuple[int, int]:
        """Start a worker on its end of the channel; its PID (the jail's reaper) and the
        read end of its stderr (the caller's to close). ``taps``: the fds of the taps
        the worker will be handed, with their network namespaces: the spawner keeps a
        copy of each and puts the tap back as it is now once the worker has ended
        (see :mod:`avmm.isolation.taps`)."""
        answer = await self._ask({"op": "spawn", "taps": [netns for _, netns in taps]},
                                 (channel_fd, *(fd for fd, _ in taps)))
        fds = answer["fds"]
        if len(fds) != 1:
            close_fds(fds)
            raise SpawnerError("the worker spawner answered without the worker's log")
        return int(answer["pid"]), fds[0]

    async def names_id(self, number: int) -> bool:
        """Whether NSS knows ``number`` as a user or a group (asked in the spawner:
        see :func:`avmm.isolation.jail.nss_names_id`)."""
        answer = await self._ask({"op": "names_id", "number": number})
        close_fds(answer["fds"])
        return answer.get("known") is not False

    async def release(self, pid: int) -> None:
        """The caller uses no PID of worker ``pid``'s any more (its reaper's, its jailed
        process's): they may be reaped, and then taken by other processes (see
        ``_Workers``). Until then both stay taken, even once the worker has ended."""
        with contextlib.suppress(SpawnerError):
            await self._ask({"op": "release", "pid": pid})

    async def kill(self, pid: int) -> None:
        """SIGKILL a worker (or the jailed process under its reaper)."""
        with contextlib.suppress(SpawnerError):
            await self._ask({"op": "kill", "pid": pid})

    async def wait(self, pid: int) -> int | None:
        """The worker's exit status (as subprocess gives it: -N for signal N); None if
        the spawner went away first."""
        while pid not in self._exits:
            if self._gone:
                return None
            await self._exited.wait()
        return self._exits.pop(pid)


if __name__ == "__main__":
    sys.exit(main())
