"""Opening the files, directories and sockets a VM config names, on the config author's
behalf: without blocking, checked by what was opened rather than by name, and, for a
daemon started with ``--allow-path``, never outside the allowed directories.

A :class:`PathPolicy` is what the VM recipe (:mod:`avmm.vm`) and the config validation of
the management API go through for every path:

* ``PathPolicy()`` (``avmm up``, an embedding program, ``avmm serve`` without
  ``--allow-path``): any path the process can reach. Opens still never block (a FIFO
  where a log file goes is refused, not waited on) and the opened file's type is checked
  on the fd, so a path swapped for something else after validation is refused too.
* ``PathPolicy([dir, ...])``: every path must resolve inside one of the directories,
  symlinks included. Each directory is opened once, at start, and every path is opened
  relative to it with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``, so the kernel
  refuses any resolution that leaves it (``..``, an absolute or escaping symlink, a
  ``/proc`` magic link) at the moment of the open: no window between a check and the use.
  Where openat2 is missing (Linux < 5.6) the path is walked one component at a time with
  ``O_NOFOLLOW`` instead, and then no symlink is followed at all.

What is opened is then used as the fd, never by name again: files are read or written
through it, a disk is reopened through ``/proc/self/fd/N`` of an ``O_PATH`` fd, a
vhost-user socket is connected through its ``O_PATH`` fd, and a console socket is bound
inside its directory's fd. :meth:`PathPolicy.open_directory` is there for paths that name
a directory (a snapshot to restore), and :meth:`PathPolicy.new_path` for one still to be
created (a snapshot to write: its parent is checked and opened, the name must be free).

Errors are :class:`~avmm.errors.HostFileError` (a ConfigError: bad input, naming the
config key) and its subclass :class:`~avmm.errors.PathNotAllowedError` (outside the
allowed directories; the API answers 403).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog

from .config import UNIX_SOCKET_PATH_MAX
from .errors import HostFileError, PathNotAllowedError

log = structlog.get_logger(__name__)

__all__ = ["BoundSocket", "NewPath", "PathKind", "PathPolicy"]

#: What a config key names, for :meth:`PathPolicy.check`: an existing file to read or use,
#: an existing socket to connect to, an output file that may be created, a socket to be
#: bound (created), a directory.
PathKind = Literal["file", "socket", "output", "bind", "directory"]

_SYS_OPENAT2: Final = 437  # x86-64 (and every architecture with the generic table)
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_BENEATH: Final = 0x08
_OUTPUT_MODE: Final = 0o644
_SOCKET_MODE: Final = 0o600
_PROBE_TIMEOUT_S: Final = 2.0


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_missing = False


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    """openat2(dirfd, path, {flags, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS}).

    :raises OSError: as open(2); ENOSYS where the kernel lacks openat2.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), path)
    return int(fd)


def _open_walking(dirfd: int, path: str, flags: int, mode: int) -> int:
    """The same as :func:`_openat2` without openat2: one component at a time, never
    following a symlink (ELOOP) and never ``..`` (EXDEV, as RESOLVE_BENEATH says)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), path)
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=dirfd)
    current = dirfd
    try:
        for part in parts[:-1]:
            following = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=current)
            if current != dirfd:
                os.close(current)
            current = following
            kind = os.fstat(current).st_mode
            if not stat.S_ISDIR(kind):
                error = errno.ELOOP if stat.S_ISLNK(kind) else errno.ENOTDIR
                raise OSError(error, os.strerror(error), path)
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=current)
        except NotADirectoryError:
            # O_DIRECTORY | O_NOFOLLOW on a symlink: say what it is.
            if stat.S_ISLNK(os.stat(parts[-1], dir_fd=current,
                                    follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
            raise
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
            # O_PATH | O_NOFOLLOW opens the symlink itself instead of failing.
            os.close(fd)
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        return fd
    finally:
        if current != dirfd:
            os.close(current)


def _open_beneath(dirfd: int, path: str, flags: int, mode: int) -> int:
    global _openat2_missing
    if not _openat2_missing:
        try:
            return _openat2(dirfd, path, flags, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _openat2_missing = True
            log.info("openat2 is missing; --allow-path follows no symlinks")
    return _open_walking(dirfd, path, flags, mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _set_blocking(fd: int) -> None:
    # Opened with O_NONBLOCK only so that the open itself cannot wait (a FIFO, a tty);
    # the fd is then used like any other.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


@dataclass
class BoundSocket:
    """A listening unix socket that :meth:`PathPolicy.bind_socket` created; ``close()``
    closes it and removes its file, unless something else has replaced it since."""

    socket: socket.socket
    path: Path
    _dirfd: int
    _name: str
    _identity: tuple[int, int]

    @classmethod
    def handed_over(cls, listener: socket.socket, path: Path) -> BoundSocket:
        """A socket another process bound and handed over (the daemon of a jailed
        worker): that process removes its file; ``close()`` here only closes it."""
        return cls(listener, path, -1, path.name, (0, 0))

    def close(self) -> None:
        self.socket.close()
        if self._dirfd < 0:
            return
        try:
            info = os.stat(self._name, dir_fd=self._dirfd, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self._name, dir_fd=self._dirfd)
        except OSError:
            pass
        _close_quietly(self._dirfd)
        self._dirfd = -1


@dataclass
class NewPath:
    """A name still free in a directory that :meth:`PathPolicy.new_path` checked: create
    it through :attr:`at` (``/proc/self/fd/D/name``), which goes to that directory
    whatever happens to the path's components meanwhile; then :meth:`close`."""

    path: Path
    dirfd: int
    name: str

    @property
    def at(self) -> str:
        return f"/proc/self/fd/{self.dirfd}/{self.name}"

    def close(self) -> None:
        if self.dirfd >= 0:
            _close_quietly(self.dirfd)
            self.dirfd = -1


class PathPolicy:
    """Where a VM's files may be (see the module docstring). ``allowed``: the directories
    of ``avmm serve --allow-path``, or None for anywhere.

    Every method may block (it opens files): call it from a worker thread, never on the
    event loop. ``key`` is the config key the path came from; errors name it.

    ``opened``: outputs that whoever checked the config has opened already, by key
    (``serial.path``, ``console.path``: an fd from :meth:`open_output`, or a
    :class:`BoundSocket` from :meth:`bind_socket`), and other host objects the build
    takes by key (``net[N].tap``: a tap's fd, see :meth:`take_opened`). A jailed worker
    is handed them by its daemon, whose directories (and /dev/net/tun) are not in its
    jail: :meth:`open_output`, :meth:`bind_socket` and :meth:`take_opened` give each one
    once (to the caller, who closes it) instead of opening the path; :meth:`close`
    closes those never asked for.

    :raises HostFileError: (from the constructor) an allowed directory cannot be opened.
    """

    def __init__(self, allowed: Iterable[str | os.PathLike[str]] | None = None, *,
                 opened: Mapping[str, int | BoundSocket] | None = None) -> None:
        self._dirs: list[tuple[Path, int]] = []
        self._opened: dict[str, int | BoundSocket] = dict(opened or {})
        self.restricted = allowed is not None
        for entry in allowed or ():
            path = Path(os.path.realpath(os.fspath(entry)))
            try:
                fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                self.close()
                raise HostFileError(f"cannot use {os.fspath(entry)} as an allowed "
                                    f"directory: {e.strerror}", key="--allow-path") from e
            self._dirs.append((path, fd))

    @property
    def allowed_dirs(self) -> tuple[Path, ...]:
        return tuple(path for path, _fd in self._dirs)

    def close(self) -> None:
        for _path, fd in self._dirs:
            _close_quietly(fd)
        self._dirs.clear()
        for opened in self._opened.values():
            if isinstance(opened, BoundSocket):
                opened.close()
            else:
                _close_quietly(opened)
        self._opened.clear()

    def take_opened(self, key: str) -> int | None:
        """The fd opened already for ``key`` (see ``opened``), given once: the caller
        owns it from here. None where there is none (the caller opens it as usual)."""
        opened = self._opened.get(key)
        if not isinstance(opened, int):
            return None
        del self._opened[key]
        return opened

    def describe(self) -> str:
        if not self.restricted:
            return "any path"
        return ", ".join(str(path) for path in self.allowed_dirs) or "no path at all"

    # -- resolving ---------------------------------------------------------------------

    def _open(self, path: Path, key: str, flags: int, mode: int = 0) -> int:
        """Open ``path`` within the policy (see the module docstring).

        :raises PathNotAllowedError: outside every allowed directory.
        :raises OSError: the open itself failed (ENOENT, EACCES, ENXIO, ...).
        """
        if not self.restricted:
            return os.open(path, flags | os.O_CLOEXEC, mode)
        outside = True
        # The name as written, and as it resolves now: the second only picks the
        # directory to open beneath (a symlinked prefix such as /var/run); the open
        # itself is what is checked, by the kernel.
        candidates = dict.fromkeys([os.path.normpath(path), os.path.realpath(path)])
        escaped: OSError | None = None
        for candidate in candidates:
            for directory, dirfd in self._dirs:
                relative = _relative_to(candidate, str(directory))
                if relative is None:
                    continue
                outside = False
                try:
                    return _open_beneath(dirfd, relative, flags, mode)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ELOOP):
                        raise
                    escaped = e
        if outside:
            raise PathNotAllowedError(
                f"{path} is outside the directories this daemon allows ({self.describe()};"
                " see avmm serve --allow-path)", key=key)
        raise PathNotAllowedError(
            f"{path} resolves outside the directories this daemon allows "
            f"({self.describe()}): a symlink or '..' leads out of them"
            + (" or they loop" if escaped is not None and escaped.errno == errno.ELOOP
               else ""), key=key)

    def _open_parent(self, path: Path, key: str) -> tuple[int, str]:
        """The directory ``path`` would be created in (an O_PATH fd) and its last name."""
        name = path.name
        if name in ("", ".", ".."):
            raise HostFileError(f"{path} does not name a file in a directory", key=key)
        try:
            dirfd = self._open(path.parent, key, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise HostFileError(f"cannot use the directory {path.parent}: {e.strerror}",
                                key=key) from e
        return dirfd, name

    def check(self, path: Path, key: str, kind: PathKind) -> None:
        """For config validation: raise :class:`PathNotAllowedError` if ``path`` (or, for
        something still to be created, its directory) lies outside the allowed
        directories. Whether the file exists or is of the right kind is left to the
        config's own checks, which run after this one. Opens nothing but O_PATH fds."""
        if not self.restricted:
            return
        try:
            fd = self._open(path, key, os.O_PATH)
        except FileNotFoundError:
            if kind not in ("output", "bind"):
                return
            try:
                dirfd, _name = self._open_parent(path, key)
            except HostFileError as e:
                if isinstance(e, PathNotAllowedError):
                    raise
                return
            os.close(dirfd)
            return
        except OSError:
            return
        os.close(fd)

    # -- opening -----------------------------------------------------------------------

    def read_file(self, path: Path, key: str, *, max_size: int, limit_text: str) -> bytes:
        """The whole of a regular file (a kernel, an initrd), read through one fd.

        :raises HostFileError: not a regular file, or larger than ``max_size`` (the
            message says "... larger than {limit_text}").
        """
        try:
            fd = self._open(path, key, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise HostFileError(f"cannot open {path}: {e.strerror}", key=key) from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise HostFileError(f"{path} is {_kind(info.st_mode)}, not a regular file",
                                    key=key)
            if info.st_size > max_size:
                raise HostFileError(f"{path} is {_size_text(info.st_size)}, larger than "
                                    f"{limit_text}", key=key)
            _set_blocking(fd)
            chunks: list[bytes] = []
            size = 0
            while size <= max_size:
                chunk = os.read(fd, min(1 << 24, max_size + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > max_size:
                raise HostFileError(f"{path} grew past {limit_text} while it was read",
                                    key=key)
            return b"".join(chunks)
        except OSError as e:
            raise HostFileError(f"cannot read {path}: {e.strerror}", key=key) from e
        finally:
            os.close(fd)

    def open_disk(self, path: Path, key: str) -> int:
        """An O_PATH fd of a disk image (a regular file or a block device); reopen it
        through ``/proc/self/fd/N`` with the access the disk needs, then close it."""
        try:
            fd = self._open(path, key, os.O_PATH)
        except OSError as e:
            raise HostFileError(f"cannot open disk image {path}: {e.strerror}",
                                key=key) from e
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            os.close(fd)
            raise HostFileError(f"cannot open disk image {path}: {e.strerror}",
                                key=key) from e
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            raise HostFileError(f"{path} is {_kind(mode)}; a disk must be a regular file "
                                "or a block device", key=key)
        return fd

    def open_output(self, path: Path, key: str) -> int:
        """A write-only fd for guest output (a serial or console log): created if
        missing (mode 0644), truncated when it is a regular file; a character device
        such as /dev/null is taken as it is. Anything else (a FIFO, a socket, a
        directory) is refused, without waiting for a reader."""
        opened = self._opened.get(key)
        if isinstance(opened, int):
            del self._opened[key]
            return opened
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = self._open(path, key, flags, _OUTPUT_MODE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                # O_NONBLOCK open of a FIFO with no reader, or of a socket file.
                raise HostFileError(f"{path} is a FIFO or a socket; name a regular file "
                                    "(or a character device such as /dev/null)",
                                    key=key) from e
            if e.errno == errno.EISDIR:
                raise HostFileError(f"{path} is a directory; name a file", key=key) from e
            raise HostFileError(f"cannot open {path} for writing: {e.strerror}",
                                key=key) from e
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                os.ftruncate(fd, 0)
            elif not stat.S_ISCHR(mode):
                raise HostFileError(f"{path} is {_kind(mode)}; name a regular file (or a "
                                    "character device such as /dev/null)", key=key)
            _set_blocking(fd)
        except OSError as e:
            os.close(fd)
            raise HostFileError(f"cannot open {path} for writing: {e.strerror}",
                                key=key) from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_path(self, path: Path, key: str) -> int:
        """An O_PATH fd of a file or directory (what a jail binds): what is checked is
        what it names, whatever the path's components become afterwards."""
        try:
            return self._open(path, key, os.O_PATH)
        except OSError as e:
            raise HostFileError(f"cannot use {path}: {e.strerror}", key=key) from e

    def open_directory(self, path: Path, key: str) -> int:
        """An O_PATH fd of a directory (e.g. for a snapshot): use it as ``dir_fd``."""
        try:
            return self._open(path, key, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise HostFileError(f"cannot use the directory {path}: {e.strerror}",
                                key=key) from e

    def new_path(self, path: Path, key: str) -> NewPath:
        """The directory ``path`` is to be created in (e.g. a snapshot directory), opened
        within the policy, and the name, which must not exist yet. Create it through
        :attr:`NewPath.at` only, so that what is created is in the directory that was
        checked (a component swapped for a symlink afterwards changes nothing); creating
        it must still refuse an existing name (mkdir, rename with RENAME_NOREPLACE): the
        check here is for the one-line error, not for safety.

        :raises PathNotAllowedError: the directory is outside the allowed ones.
        :raises HostFileError: the directory cannot be used, or ``path`` exists.
        """
        dirfd, name = self._open_parent(path, key)
        try:
            os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return NewPath(path, dirfd, name)
        except OSError as e:
            os.close(dirfd)
            raise HostFileError(f"cannot use {path}: {e.strerror}", key=key) from e
        os.close(dirfd)
        raise HostFileError(f"{path} already exists; name a new directory", key=key)

    def socket_address(self, path: Path, key: str) -> tuple[str, int | None]:
        """Where to connect(2) for the unix socket at ``path`` (a vhost-user back-end),
        and an fd to keep open as long as that address is used (None if none).

        Restricted: ``/proc/self/fd/N`` of an O_PATH fd of the socket itself, so the
        connection goes to the socket that was checked. Anywhere: ``path``.
        """
        if not self.restricted:
            return os.fspath(path), None
        try:
            fd = self._open(path, key, os.O_PATH)
        except OSError as e:
            raise HostFileError(f"cannot use the socket {path}: {e.strerror}",
                                key=key) from e
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            os.close(fd)
            raise HostFileError(f"{path} is {_kind(mode)}, not a unix socket", key=key)
        return f"/proc/self/fd/{fd}", fd

    def socket_directory(self, path: Path, key: str) -> tuple[str, int | None]:
        """Like :meth:`socket_address`, but the address goes through an O_PATH fd of the
        socket's *directory* (``/proc/self/fd/D/name``): it still reaches a socket that
        was recreated under the same name (a restarted back-end), within the same
        directory."""
        if not self.restricted:
            return os.fspath(path), None
        dirfd, name = self._open_parent(path, key)
        return f"/proc/self/fd/{dirfd}/{name}", dirfd

    def bind_socket(self, path: Path, key: str, *, hint: str = "choose another path"
                    ) -> BoundSocket:
        """A unix socket listening at ``path`` with mode 0600 from the moment it exists.

        A socket file left by a program that died is replaced; a path where a server
        answers, or that holds anything but a socket, is refused and left untouched.
        """
        opened = self._opened.get(key)
        if isinstance(opened, BoundSocket):
            del self._opened[key]
            return opened
        if len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
            raise HostFileError(f"{path} is {len(os.fsencode(path))} bytes long; a unix "
                                f"socket path has at most {UNIX_SOCKET_PATH_MAX}", key=key)
        dirfd, name = self._open_parent(path, key)
        # The directory's fd, not the name: what is checked, removed and bound below is
        # in the directory that was resolved, whatever happens to the path meanwhile.
        at = f"/proc/self/fd/{dirfd}/{name}"
        listener: socket.socket | None = None
        try:
            _claim(dirfd, name, at, path, key, hint)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # The mode of a socket file comes from the socket's inode (less the umask),
            # so this makes it 0600 without touching the process-wide umask.
            os.fchmod(listener.fileno(), _SOCKET_MODE)
            listener.bind(at)
            info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            listener.listen(1)
        except OSError as e:
            if listener is not None:
                listener.close()
            _close_quietly(dirfd)
            raise HostFileError(f"cannot listen on {path}: {e.strerror or e}", key=key) from e
        except BaseException:
            if listener is not None:
                listener.close()
            _close_quietly(dirfd)
            raise
        return BoundSocket(listener, path, dirfd, name, (info.st_dev, info.st_ino))


def server_listens(address: str | bytes) -> bool:
    """Whether a server accepts connections on the unix socket at ``address`` (a path):
    False for a socket file nobody listens on (left by a program that died) or no file.
    Blocking, up to a 2 s time-out. OSError when it cannot be told (then nothing may be
    assumed: the caller refuses to replace the file)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(_PROBE_TIMEOUT_S)
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def _claim(dirfd: int, name: str, at: str, path: Path, key: str, hint: str) -> None:
    """Make ``name`` in ``dirfd`` free for a socket: remove a stale socket; refuse a
    live server or any other kind of file (which is never touched)."""
    try:
        info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise HostFileError(f"{path} exists and is {_kind(info.st_mode)}, not a socket; "
                            f"remove it or {hint}", key=key)
    try:
        listens = server_listens(at)
    except OSError as e:
        raise HostFileError(f"cannot tell whether a server listens on {path}: "
                            f"{e.strerror or e}", key=key) from e
    if listens:
        raise HostFileError(f"another program is listening on {path}; stop it or {hint}",
                            key=key)
    log.info("replacing a stale socket", socket=str(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)


def _relative_to(path: str, directory: str) -> str | None:
    if path == directory:
        return "."
    prefix = directory if directory.endswith("/") else directory + "/"
    if path.startswith(prefix):
        return path[len(prefix):]
    return None


def _size_text(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size} bytes"
