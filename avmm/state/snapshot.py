"""A snapshot directory: ``state.avmm`` (see :mod:`avmm.state.format`) and
``memory.avmm`` (see :mod:`avmm.state.memory_file`), written whole or not at all.

:func:`write_snapshot` builds the directory under a temporary name next to the target
(``.<name>.partial-<pid>-<random>``), writes the memory file, then the state file
(which records the memory file's size and digest), fsyncs both and the directory, and
only then renames it to its name (refusing to replace anything) and fsyncs the parent.
A crash at any point leaves either no snapshot under that name or a whole one; a
leftover ``.partial`` directory is never mistaken for a snapshot. The directory is mode
0700: it holds guest memory.

:func:`read_snapshot` checks the state file completely and the memory file's presence
and size; :func:`load_memory` then maps or copies the memory (and checks its digest when
copying, or when asked).

Everything here blocks: call it from a worker thread, not the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import SnapshotError
from .format import _kind, read_state_fd, write_state_file
from .memory_file import GuestRam, MemoryImage, copy_memory_file, map_memory_file, write_memory_file

STATE_FILE_NAME = "state.avmm"
MEMORY_FILE_NAME = "memory.avmm"
#: The section of the state file that describes the memory file.
MEMORY_SECTION = "memory"


@dataclass(frozen=True)
class SnapshotInfo:
    """What :func:`write_snapshot` wrote."""

    path: Path
    bytes_state: int
    #: Bytes of guest memory in the memory file (its holes not counted).
    bytes_memory: int
    duration_s: float


@dataclass
class Snapshot:
    """A snapshot read back: its checked sections, and its memory file if it has one,
    open (``memory_fd``) since it was checked, so that what is loaded is what was
    checked. :meth:`close` it (or use it as a context manager) once the memory is
    loaded or the restore gave up; a mapping made from it keeps the file on its own."""

    path: Path
    sections: dict[str, Any]
    memory: MemoryImage | None
    memory_path: Path | None
    memory_fd: int = -1
    _closer: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self.memory_fd = -1

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def write_snapshot(directory: Path, sections: Mapping[str, Any],
                   memory: GuestRam | None) -> SnapshotInfo:
    """Write ``sections`` (name → state dataclass) and ``memory`` as the new snapshot
    directory ``directory``, whose parent must exist. The guest must not run meanwhile.

    The parent may be an API client's directory, who can rename, replace or symlink
    anything in it meanwhile: the parent is opened once and everything is done through
    fds, never by a path again. The temporary directory is made with ``mkdirat``,
    opened with ``O_NOFOLLOW`` and checked to be the new empty directory of this user;
    the files are made inside its fd (``O_CREAT|O_EXCL|O_NOFOLLOW``); before the rename
    its name must still be that directory (same device and inode), else nothing is
    renamed. So nothing is ever written outside the parent that was opened.

    :raises SnapshotError: ``directory`` exists, its parent does not, the temporary
        directory was replaced, or writing failed (nothing is left behind then).
    """
    started = time.monotonic()
    directory = Path(directory)
    if MEMORY_SECTION in sections:
        raise ValueError(f"section name {MEMORY_SECTION!r} is reserved for the memory file")
    name = directory.name
    if name in ("", ".", ".."):
        raise SnapshotError(f"{directory}: does not name a new directory")
    parent = directory.parent
    parent_fd = _open_directory(parent, missing=f"{directory}: its parent directory does "
                                "not exist", cannot=f"{directory}: cannot open its parent "
                                "directory")
    try:
        if _exists(name, parent_fd):
            raise SnapshotError(f"{directory}: already exists; snapshots are written to a "
                                "new directory")
        partial = f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(partial, 0o700, dir_fd=parent_fd)
        except OSError as e:
            raise SnapshotError(f"{directory}: cannot create the snapshot: {e.strerror}") \
                from None
        partial_fd = -1
        try:
            partial_fd = _open_new_directory(partial, parent_fd, directory)
            image = (write_memory_file(memory, MEMORY_FILE_NAME, dir_fd=partial_fd)
                     if memory else None)
            bytes_state = write_state_file(STATE_FILE_NAME, {**sections, MEMORY_SECTION: image},
                                           dir_fd=partial_fd)
            os.fsync(partial_fd)
            if not _is_same(partial, parent_fd, partial_fd):
                raise SnapshotError(_replaced(directory))
            _rename_no_replace(parent_fd, partial, name)
            os.fsync(parent_fd)
        except BaseException as e:
            _remove_partial(parent_fd, partial, partial_fd)
            if isinstance(e, OSError):
                raise SnapshotError(f"{directory}: cannot write the snapshot: "
                                    f"{e.strerror or e}") from e
            raise
        finally:
            if partial_fd >= 0:
                os.close(partial_fd)
    finally:
        os.close(parent_fd)
    return SnapshotInfo(path=directory, bytes_state=bytes_state,
                        bytes_memory=image.data_bytes if image else 0,
                        duration_s=time.monotonic() - started)


def _open_directory(path: Path, *, missing: str, cannot: str) -> int:
    """An fd of the directory ``path``; SnapshotError with ``missing`` when there is no
    such directory, ``cannot`` (and the reason) when it cannot be opened."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise SnapshotError(missing) from None
    except OSError as e:
        raise SnapshotError(f"{cannot}: {e.strerror}") from None


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _replaced(directory: Path) -> str:
    return (f"{directory}: the snapshot's temporary directory was replaced while it was "
            f"written (by someone else writing in {directory.parent}?); nothing was kept")


def _open_new_directory(partial: str, parent_fd: int, directory: Path) -> int:
    """The directory just made as ``partial``, opened without following a symlink, and
    checked to be what mkdir made: a directory of ours, mode 0700, empty. (Someone who
    can write the parent could have swapped it in the moment between; a directory owned
    by this user they cannot make, unless they are this user.)"""
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            raise SnapshotError(_replaced(directory)) from None
        raise
    try:
        info = os.fstat(fd)
        if (info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077
                or os.listdir(fd)):
            raise SnapshotError(_replaced(directory))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_same(name: str, dir_fd: int, fd: int) -> bool:
    """Whether ``name`` in ``dir_fd`` is (still) the file open as ``fd``."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_partial(parent_fd: int, partial: str, partial_fd: int) -> None:
    """Undo a failed write: the files made inside the temporary directory (through its
    fd, wherever it is now), then the directory if its name is still it."""
    if partial_fd >= 0:
        for file_name in (MEMORY_FILE_NAME, STATE_FILE_NAME):
            with contextlib.suppress(OSError):
                os.unlink(file_name, dir_fd=partial_fd)
        if not _is_same(partial, parent_fd, partial_fd):
            return
    with contextlib.suppress(OSError):
        os.rmdir(partial, dir_fd=parent_fd)


def read_snapshot(directory: Path, expect: Mapping[str, Any]) -> Snapshot:
    """Read and check the snapshot in ``directory``: ``expect`` maps each section (the
    memory section aside) to its type. The memory file must be there with the size
    the state file recorded; its contents are checked by :func:`load_memory`.

    The directory is opened once and both files are opened inside it (``openat``)
    without following a symlink and without blocking (a FIFO is refused, not waited
    on), and must be regular files: the directory may be an API client's, who can put
    anything in it. The memory file stays open in the result (see :class:`Snapshot`).
    """
    directory = Path(directory)
    if MEMORY_SECTION in expect:
        raise ValueError(f"section name {MEMORY_SECTION!r} is reserved for the memory file")
    dirfd = _open_directory(directory, missing=f"{directory}: no such snapshot directory",
                            cannot=f"{directory}: cannot open the snapshot directory")
    try:
        state_path = directory / STATE_FILE_NAME
        state_fd = _open_inside(dirfd, STATE_FILE_NAME, state_path, missing=(
            f"{directory}: not a snapshot (it has no {STATE_FILE_NAME})"))
        try:
            sections = read_state_fd(state_fd, {**expect, MEMORY_SECTION: MemoryImage | None},
                                     name=str(state_path))
        finally:
            os.close(state_fd)
        image: MemoryImage | None = sections.pop(MEMORY_SECTION)
        if image is None:
            return Snapshot(path=directory, sections=sections, memory=None, memory_path=None)
        if image.file in ("", ".", "..") or Path(image.file).name != image.file:
            raise SnapshotError(f"{state_path}: names a memory file outside the snapshot "
                                f"({image.file!r})")
        memory_path = directory / image.file
        memory_fd = _open_inside(dirfd, image.file, memory_path, missing=(
            f"{memory_path}: the snapshot's memory file is missing"))
    finally:
        os.close(dirfd)
    snapshot = Snapshot(path=directory, sections=sections, memory=image,
                        memory_path=memory_path, memory_fd=memory_fd)
    # Closed by close(), or when the Snapshot is dropped without it (a caller that gave up).
    snapshot._closer = weakref.finalize(snapshot, os.close, memory_fd)
    try:
        size = os.fstat(memory_fd).st_size
        if size != image.size:
            raise SnapshotError(f"{memory_path}: the memory file has {size} bytes, the "
                                f"snapshot recorded {image.size} (truncated or replaced?)")
    except BaseException:
        snapshot.close()
        raise
    return snapshot


def _open_inside(dirfd: int, name: str, path: Path, *, missing: str) -> int:
    """``name`` in the directory ``dirfd``, opened read-only without following a symlink
    and without blocking; it must be a regular file. ``path`` names it in messages."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dirfd)
    except FileNotFoundError:
        raise SnapshotError(missing) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotError(f"{path}: is a symlink; a snapshot's files must be regular "
                                "files in its directory") from None
        raise SnapshotError(f"{path}: cannot open it: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else _kind(mode)
            raise SnapshotError(f"{path}: is {what}, not a regular file; a snapshot's files "
                                "must be regular files")
    except BaseException:
        os.close(fd)
        raise
    return fd


def others_can_change_memory(snapshot: Snapshot) -> str | None:
    """Why someone other than this process's user could change the snapshot's memory
    file (it belongs to another user, or its group or others may write it), or None.

    A mapped memory file (:func:`load_memory` without ``copy``) must stay unchanged
    while the VM runs: truncated, it would kill the whole process with SIGBUS at the
    next touch of a page no longer in the file. Whoever owns the file, or may write it,
    can truncate it. A daemon whose API clients may be other users (``--allow-path``)
    therefore maps only a file that is its own user's and not writable by group or
    others, and copies any other. (It cannot seal a file it does not own; a file it
    owns, only root or its own user can change.)"""
    if snapshot.memory_fd < 0:
        return None
    info = os.fstat(snapshot.memory_fd)
    if info.st_uid != os.geteuid():
        return f"the memory file belongs to uid {info.st_uid}, not to this daemon's user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"the memory file is writable by its group or others (mode "
                f"{stat.S_IMODE(info.st_mode):o})")
    return None


def load_memory(snapshot: Snapshot, memory: GuestRam, *, copy: bool = False,
                verify: bool | None = None) -> None:
    """Bring the snapshot's guest RAM into ``memory`` (new, all zero, not yet given to
    KVM): mapped copy-on-write from the file (nothing is read up front), or copied with
    ``copy``. ``verify`` checks the memory file's digest, reading all its data once: by
    default when copying (which reads it all anyway), not when mapping (that would undo
    what mapping saves). The state file is always checked in full. The memory file is
    the one :func:`read_snapshot` opened and checked, never opened again by name."""
    if snapshot.memory is None or snapshot.memory_path is None:
        raise SnapshotError(f"{snapshot.path}: the snapshot has no guest memory")
    if snapshot.memory_fd < 0:
        raise SnapshotError(f"{snapshot.path}: the snapshot was closed before its memory "
                            "was loaded")
    if verify is None:
        verify = copy
    if copy:
        copy_memory_file(snapshot.memory_fd, memory, snapshot.memory, verify=verify,
                         name=snapshot.memory_path)
    else:
        map_memory_file(snapshot.memory_fd, memory, snapshot.memory, verify=verify,
                        name=snapshot.memory_path)


_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _rename_no_replace(dir_fd: int, source: str, target: str) -> None:
    """renameat2(2) within ``dir_fd`` that fails if ``target`` appeared meanwhile (plain
    rename would replace an empty directory)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(dir_fd, os.fsencode(source), dir_fd, os.fsencode(target),
                           _RENAME_NOREPLACE)
        if result == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(error, os.strerror(error), target)
    if _exists(target, dir_fd):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), target)
    os.rename(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
