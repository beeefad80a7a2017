"""``avmm serve``: one :class:`avmm.host.Host` behind the management API on a unix socket.

The socket is ours alone (mode 0600; 0660 and the group's ownership with ``group=``),
created 0600 by bind(2) (the socket inode's mode, set before), never left group- or
world-accessible for a moment. A socket file left by a daemon that died is replaced; a
path where a live server answers is refused. The file is removed on the way out, unless
someone else has replaced it meanwhile.

HTTP is hypercorn's trio worker (``hypercorn.trio.serve``): no asyncio loop anywhere.

``--group`` hands the daemon's file access to every member of the group (a VM config
names files the daemon opens), so ``avmm serve`` refuses it unless ``--allow-path``
says where those files may be (a :class:`~avmm.paths.PathPolicy`), or
``--allow-any-path`` says that anywhere is meant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import signal
import socket
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..config import UNIX_SOCKET_PATH_MAX
from ..errors import AvmmError, HostFileError
from ..isolation.ip_sockets import install_daemon_filters
from ..isolation.seccomp import SeccompMode
from ..paths import PathPolicy, server_listens
from ._app import ManagementApi

log = structlog.get_logger(__name__)

__all__ = ["DaemonError", "run_daemon", "serve_api"]

#: How long in-flight requests (console streams included) may take once shutdown began.
GRACEFUL_TIMEOUT_S: Final = 5.0


class DaemonError(AvmmError):
    """The daemon cannot start: its socket path is taken, the group is unknown, an
    allowed directory cannot be opened, or --group was given without --allow-path."""


async def serve_api(host: Any, socket_path: str | os.PathLike[str], *,
                    group: str | None = None, draining: trio.Event | None = None,
                    shutdown: trio.Event | None = None, paths: PathPolicy | None = None,
                    before_serving: Callable[[], None] | None = None,
                    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API for ``host`` on ``socket_path`` until ``shutdown`` is set (or the
    task is cancelled); then stop listening, give in-flight requests a few seconds and
    remove the socket. ``task_status.started`` reports the path once clients can connect.
    The caller owns ``host`` (and stops its VMs). ``paths``: where the files of the VM
    configs that clients send may be (default: anywhere the daemon can reach).
    ``before_serving`` runs once the socket is bound, before the first connection is
    accepted (the daemon loads its seccomp filter there)."""
    path = Path(os.path.abspath(socket_path))
    listener, identity = _bind(path, group)
    try:
        if before_serving is not None:
            before_serving()
        config = HypercornConfig()
        # hypercorn adopts the fd (its socket object closes it); ours must not too.
        config.bind = [f"fd://{listener.detach()}"]
        config.accesslog = None
        config.loglevel = "WARNING"  # our own log says when we listen and stop
        config.graceful_timeout = GRACEFUL_TIMEOUT_S
        app = ManagementApi(host, draining=draining, paths=paths)
        stop = shutdown if shutdown is not None else trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(
                hypercorn_serve, app, config, shutdown_trigger=stop.wait))
            log.info("management API listening", socket=str(path), group=group,
                     allowed_paths=app.paths.describe())
            task_status.started(path)
    finally:
        listener.close()
        _remove_if_ours(path, identity)


async def run_daemon(socket_path: str | os.PathLike[str], *, group: str | None = None,
                     allow_paths: Sequence[str | os.PathLike[str]] | None = None,
                     allow_any_path: bool = False, seccomp: SeccompMode = SeccompMode.OFF,
                     isolation: Any = None,
                     task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """``avmm serve``: a Host and its API until SIGTERM or SIGINT, then a clean shutdown
    (new VMs refused, every VM stopped and its disks flushed, socket removed).

    ``allow_paths``: the only directories the files of a VM config may be in (see
    :class:`~avmm.paths.PathPolicy`). With ``group`` they are required, unless
    ``allow_any_path`` says that every group member may have the daemon open anything
    its user can.

    ``seccomp``: the syscall filters (see :mod:`avmm.isolation.seccomp`), loaded once the
    socket is bound and before the first request is served; ``avmm serve`` loads them in
    kill mode unless told otherwise, an embedder's daemon loads none by default.

    ``isolation``: a :class:`~avmm.isolation.worker_vm.ProcessIsolation` runs each VM
    in a jailed worker process (``--isolation process``); None keeps them all here. The
    workers are started by a spawner process made before the daemon's filter is loaded
    (a filter is inherited; each worker loads its own once it is jailed).

    :raises DaemonError: it cannot start (one line saying why).
    """
    if group is not None and not allow_paths and not allow_any_path:
        raise DaemonError(
            f"--group {group} lets every member of the group have this daemon open any "
            "file its user can (a VM config names kernels, disks, log files); say where "
            "those may be with --allow-path DIR (repeatable), or give --allow-any-path")
    if allow_paths and allow_any_path:
        raise DaemonError("--allow-path and --allow-any-path contradict each other; give one")
    try:
        paths = await trio.to_thread.run_sync(PathPolicy, allow_paths or None)
    except HostFileError as e:
        raise DaemonError(e.reason) from None
    try:
        await _run_daemon(socket_path, group, paths, seccomp, task_status, isolation)
    finally:
        paths.close()


async def _run_daemon(socket_path: str | os.PathLike[str], group: str | None,
                      paths: PathPolicy, seccomp: SeccompMode,
                      task_status: trio.TaskStatus[Path], isolation: Any = None) -> None:
    from ..cgroups import cleanup_stale
    from ..host import Host  # KVM and the device models: only for a real daemon

    # The cgroups of an avmm that crashed (its PID is gone): before any VM of ours starts.
    await trio.to_thread.run_sync(cleanup_stale)
    jail_root = getattr(isolation, "jail_root", None)
    if jail_root is not None:
        # Likewise the jails a killed daemon left (empty directories it marked).
        from ..cgroups.backend import owner_alive
        from ..isolation.jail import remove_stale_jails

        await trio.to_thread.run_sync(remove_stale_jails, jail_root, owner_alive)
    draining = trio.Event()
    shutdown = trio.Event()
    # Before the socket exists: a signal sent as soon as a client sees it must count.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Host(isolation=isolation) as host, trio.open_nursery() as nursery:
            path = await nursery.start(lambda task_status: serve_api(
                host, socket_path, group=group, draining=draining, shutdown=shutdown,
                paths=paths, before_serving=functools.partial(install_daemon_filters, seccomp),
                task_status=task_status))
            task_status.started(path)
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name,
                         vms=len(host.list()))
                break
            draining.set()
            # Stopping the VMs first also ends their console streams, so the HTTP
            # server's graceful shutdown has nothing left to wait for.
            await host.stop_all()
            shutdown.set()
    log.info("stopped", socket=str(path))


def _bind(path: Path, group: str | None) -> tuple[socket.socket, tuple[int, int]]:
    gid = _group_id(group) if group is not None else None
    mode = 0o660 if gid is not None else 0o600
    _claim(path)
    # Made at a temporary name and linked into place once it listens with its final
    # owner and mode: a client that finds the socket file (the usual sign that the
    # daemon is up) can connect at once, and never sees it refuse or with the mode it
    # had for a moment. link(2), unlike rename(2), never replaces a file that turned up
    # at ``path`` meanwhile. A temporary name over sun_path's limit: bound in place.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if len(os.fsencode(temporary)) > UNIX_SOCKET_PATH_MAX:
        temporary = path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if temporary != path:
                os.unlink(temporary)  # left by a daemon of this pid that died
        # bind(2) gives the socket file the socket inode's mode less the umask: 0600
        # first, so that the file is never open to anyone else, without changing the
        # process-wide umask (other threads may be creating files meanwhile). The group
        # gets its access only once the file belongs to that group.
        os.fchmod(listener.fileno(), 0o600)
        listener.bind(os.fsencode(temporary))
        _set_owner_and_mode(temporary, gid, mode)
        listener.listen(128)
        if temporary != path:
            os.link(temporary, path)
            os.unlink(temporary)
        info = os.lstat(path)
    except OSError as e:
        listener.close()
        if temporary != path:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise DaemonError(f"cannot listen on {path}: {e.strerror or e}") from e
    return listener, (info.st_dev, info.st_ino)


def _set_owner_and_mode(path: Path, gid: int | None, mode: int) -> None:
    """Give the socket file just bound at ``path`` its group and exact mode (whatever the
    umask left) without following a symlink: chown(2) and chmod(2) by name follow one,
    so a file swapped for a symlink in the socket's directory would hand a file
    elsewhere to the group (a root daemon's --group). The file is opened as itself
    (``O_PATH | O_NOFOLLOW``), must be a socket of this process's user, and is changed
    through its /proc/self/fd link, which names that very file."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "the file at the path is no longer the socket just "
                                       "bound (replaced meanwhile)")
        itself = f"/proc/self/fd/{fd}"
        if gid is not None:
            os.chown(itself, -1, gid)
        os.chmod(itself, mode)
    finally:
        os.close(fd)


def _claim(path: Path) -> None:
    """Make ``path`` free: remove a stale socket; refuse a live server or another file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise DaemonError(f"directory not found: {path.parent} (for the socket {path}); "
                              "create it or choose another --socket") from None
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; remove it or choose another "
                          "--socket")
    try:
        listens = server_listens(os.fsencode(path))
    except OSError as e:
        raise DaemonError(f"cannot tell whether a server listens on {path}: "
                          f"{e.strerror or e}") from e
    if listens:
        raise DaemonError(f"another server is listening on {path}; stop it (an `avmm "
                          "serve` answers `avmm ps --socket PATH`) or choose another "
                          "--socket")
    log.info("replacing a stale socket", socket=str(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise DaemonError(f"unknown group {group!r} (see /etc/group); the socket would be "
                          "shared with its members") from None




def _remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
