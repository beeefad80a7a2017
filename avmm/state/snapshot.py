"""A snapshot directory: ``state.avmm`` (see :mod:`avmm.state.format`) and
``memory.avmm`` (see :mod:`avmm.state.memory_file`), written whole or not at all.

:func:`write_snapshot` builds the directory under a temporary name next to the target
(``.<name>.partial-<pid>-<random>``), writes the memory file, then the state file
(which records the memory file's size and digest), fsyncs both and the directory, and
only then renames it to its name (refusing to replace anything) and fsyncs the parent.
A crash at any point leaves either no snapshot under that name or a whole one; a
leftover ``.partial`` directory is never mistaken for a snapshot. The directory is mode
0700: it holds guest memory.

The two halves can be done by two processes: :class:`PartialSnapshot` (the directory,
and the two files made in it) by ``avmm serve``, and :func:`write_snapshot_files`
(their contents, into the open files only) by a VM in a jailed worker, which is never
handed a directory (openat with ".." would walk out of its jail).

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
from .format import (
    MAX_STATE_FILE_BYTES,
    _kind,
    _write_state_bytes,
    parse_state,
    read_state_fd,
    write_state_fd,
    write_state_file,
)
from .memory_file import (
    GuestRam,
    MemoryImage,
    copy_image_file,
    copy_memory_file,
    map_memory_file,
    write_memory_fd,
    write_memory_file,
)

STATE_FILE_NAME = "state.avmm"
MEMORY_FILE_NAME = "memory.avmm"
#: The names of the files another process is handed to write (see
#: :meth:`PartialSnapshot.take_over_files`): never the snapshot's own files.
_HANDED_OUT = {STATE_FILE_NAME: ".state.written", MEMORY_FILE_NAME: ".memory.written"}
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

    The directory part is :class:`PartialSnapshot`'s (see there why nothing is ever
    written outside the parent that was opened); the files are made inside the
    temporary directory's fd (``O_CREAT|O_EXCL|O_NOFOLLOW``), the memory file first.

    :raises SnapshotError: ``directory`` exists, its parent does not, the temporary
        directory was replaced, or writing failed (nothing is left behind then).
    """
    started = time.monotonic()
    directory = Path(directory)
    if MEMORY_SECTION in sections:
        raise ValueError(f"section name {MEMORY_SECTION!r} is reserved for the memory file")
    with PartialSnapshot.begin(directory) as partial:
        try:
            image = (write_memory_file(memory, MEMORY_FILE_NAME, dir_fd=partial.fd)
                     if memory else None)
            bytes_state = write_state_file(STATE_FILE_NAME, {**sections, MEMORY_SECTION: image},
                                           dir_fd=partial.fd)
            partial.commit()
        except OSError as e:
            raise SnapshotError(f"{directory}: cannot write the snapshot: "
                                f"{e.strerror or e}") from e
    return SnapshotInfo(path=directory, bytes_state=bytes_state,
                        bytes_memory=image.data_bytes if image else 0,
                        duration_s=time.monotonic() - started)


@dataclass(frozen=True)
class SnapshotFiles:
    """The two files of a snapshot being written, open for writing: new, empty regular
    files that :meth:`PartialSnapshot.create_files` made. What a VM in a jailed worker
    is handed instead of a directory (see :func:`write_snapshot_files`)."""

    state_fd: int
    memory_fd: int


def write_snapshot_files(files: SnapshotFiles, sections: Mapping[str, Any],
                         memory: GuestRam, *, path: Path) -> SnapshotInfo:
    """Write ``sections`` and ``memory`` into ``files`` (the memory file first, then the
    state file that records its size and digest) and fsync both; the fds stay open.
    Whoever made the files names, renames or removes their directory; ``path`` (what it
    will be called) is only put in the result. Nothing is opened: a jailed worker may
    do this with no directory of the host in reach. The guest must not run meanwhile.

    :raises SnapshotError: a file is not a regular file, or writing failed.
    """
    started = time.monotonic()
    if MEMORY_SECTION in sections:
        raise ValueError(f"section name {MEMORY_SECTION!r} is reserved for the memory file")
    try:
        image = write_memory_fd(memory, files.memory_fd, file_name=MEMORY_FILE_NAME)
        bytes_state = write_state_fd(files.state_fd, {**sections, MEMORY_SECTION: image})
    except OSError as e:
        raise SnapshotError(f"{path}: cannot write the snapshot: {e.strerror or e}") from e
    return SnapshotInfo(path=path, bytes_state=bytes_state, bytes_memory=image.data_bytes,
                        duration_s=time.monotonic() - started)


class PartialSnapshot:
    """The directory part of writing a snapshot: a temporary directory next to the
    target, renamed to it once whole, removed with what is in it otherwise.

    The parent may be an API client's directory, who can rename, replace or symlink
    anything in it meanwhile: the parent is opened once and everything is done through
    fds, never by a path again. The temporary directory is made with ``mkdirat`` (mode
    0700), opened with ``O_NOFOLLOW`` and checked to be the new empty directory of this
    user; files are made inside its fd only; before the rename its name must still be
    that directory (same device and inode), else nothing is renamed. So nothing is ever
    written outside the parent that was opened.

    Use it as a context manager: leaving it without :meth:`commit` (an error, a
    cancellation) removes the temporary directory and the files made in it. Everything
    here blocks.
    """

    def __init__(self, directory: Path, parent_fd: int, partial: str, fd: int) -> None:
        self.directory = directory
        self._parent_fd = parent_fd
        self._partial = partial
        #: The temporary directory (make files inside it only through this fd).
        self.fd = fd
        self._files: SnapshotFiles | None = None
        self._handed_out = False
        self._committed = False

    @classmethod
    def begin(cls, directory: Path, *, parent_fd: int | None = None) -> PartialSnapshot:
        """Make the temporary directory for the new snapshot ``directory``. Its parent
        is opened by name, or is ``parent_fd`` (a directory opened by the caller, e.g.
        through its path policy; an O_PATH fd will do: it is opened again for reading,
        and ``directory`` then only names the snapshot in messages).

        :raises SnapshotError: ``directory`` exists, its parent does not, or the
            temporary directory cannot be made (nothing is left then).
        """
        name = directory.name
        if name in ("", ".", ".."):
            raise SnapshotError(f"{directory}: does not name a new directory")
        if parent_fd is None:
            opened = _open_directory(directory.parent, missing=(
                f"{directory}: its parent directory does not exist"), cannot=(
                f"{directory}: cannot open its parent directory"))
        else:
            try:
                opened = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=parent_fd)
            except OSError as e:
                raise SnapshotError(f"{directory}: cannot open its parent directory: "
                                    f"{e.strerror}") from None
        try:
            if _exists(name, opened):
                raise SnapshotError(f"{directory}: already exists; snapshots are written "
                                    "to a new directory")
            partial = f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(partial, 0o700, dir_fd=opened)
            except OSError as e:
                raise SnapshotError(f"{directory}: cannot create the snapshot: "
                                    f"{e.strerror}") from None
            try:
                fd = _open_new_directory(partial, opened, directory)
            except BaseException:
                _remove_partial(opened, partial, -1)
                raise
        except BaseException:
            os.close(opened)
            raise
        return cls(directory, opened, partial, fd)

    @property
    def files(self) -> SnapshotFiles | None:
        """The files :meth:`create_files` made, while they are open."""
        return self._files

    def create_files(self, *, handed_out: bool = False) -> SnapshotFiles:
        """The state and memory files, new in the temporary directory
        (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600), open for writing; they are fsynced
        by :meth:`commit` and closed by :meth:`close`. ``handed_out``: files to hand to
        another process (a jailed worker), under other names; they never become the
        snapshot's files themselves (it could write to them after the commit, and into
        every VM restored with them mapped): :meth:`take_over_files` copies them."""
        if self._files is not None:
            raise ValueError("the snapshot's files were made already")
        names = _HANDED_OUT if handed_out else {name: name for name in _HANDED_OUT}
        self._files = self._new_files(names[STATE_FILE_NAME], names[MEMORY_FILE_NAME])
        self._handed_out = handed_out
        return self._files

    def _new_files(self, state: str, memory: str) -> SnapshotFiles:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        state_fd = os.open(state, flags, 0o600, dir_fd=self.fd)
        try:
            memory_fd = os.open(memory, flags, 0o600, dir_fd=self.fd)
        except BaseException:
            os.close(state_fd)
            raise
        return SnapshotFiles(state_fd=state_fd, memory_fd=memory_fd)

    def take_over_files(self, expect: Mapping[str, Any], *,
                        max_memory_bytes: int) -> tuple[int, int]:
        """Make the snapshot's files from the ones :meth:`create_files` handed out:
        check the state file (``expect`` as for :func:`read_snapshot`; at most
        :data:`~avmm.state.format.MAX_STATE_FILE_BYTES`) and that the memory file is
        the image it records (size at most ``max_memory_bytes``, data and SHA-256), copy
        both into new files only this process holds, and remove the handed-out ones.
        Whatever the other process does with its fds afterwards reaches only inodes
        that are gone. The state file's size and the memory file's data bytes.

        :raises SnapshotError: the files are not a snapshot of that shape.
        """
        if self._files is None or not self._handed_out:
            raise ValueError("take_over_files needs files made with handed_out=True")
        name = str(self.directory)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        state_in = os.open(_HANDED_OUT[STATE_FILE_NAME], flags, dir_fd=self.fd)
        try:
            memory_in = os.open(_HANDED_OUT[MEMORY_FILE_NAME], flags, dir_fd=self.fd)
            try:
                data = os.pread(state_in, MAX_STATE_FILE_BYTES + 1, 0)
                if len(data) > MAX_STATE_FILE_BYTES:
                    raise SnapshotError(f"{name}: the state file written is too large")
                sections = parse_state(data, {**expect, MEMORY_SECTION: MemoryImage},
                                       name=f"{name}: the state file written")
                image = sections[MEMORY_SECTION]
                if image.file != MEMORY_FILE_NAME or image.size > max_memory_bytes:
                    raise SnapshotError(f"{name}: the state file written records a memory "
                                        "file this VM cannot have")
                files = self._new_files(STATE_FILE_NAME, MEMORY_FILE_NAME)
                written, self._files = self._files, files
                for fd in (written.state_fd, written.memory_fd):
                    os.close(fd)
                copy_image_file(memory_in, files.memory_fd, image, name=name)
                size = _write_state_bytes(files.state_fd, data)
            finally:
                os.close(memory_in)
        finally:
            os.close(state_in)
        for handed in _HANDED_OUT.values():
            os.unlink(handed, dir_fd=self.fd)
        self._handed_out = False
        return size, image.data_bytes

    def commit(self) -> None:
        """fsync the files (those of :meth:`create_files` too: whoever wrote them is not
        relied on for it) and the directory, then rename it to the snapshot's name,
        refusing to replace anything, and fsync the parent.

        :raises SnapshotError: the temporary directory was replaced meanwhile.
        :raises OSError: fsync or the rename failed (the target appeared meanwhile).
        """
        if self._files is not None:
            os.fsync(self._files.memory_fd)
            os.fsync(self._files.state_fd)
        os.fsync(self.fd)
        if not _is_same(self._partial, self._parent_fd, self.fd):
            raise SnapshotError(_replaced(self.directory))
        _rename_no_replace(self._parent_fd, self._partial, self.directory.name)
        self._committed = True
        os.fsync(self._parent_fd)

    def discard(self) -> None:
        """Remove the temporary directory and the files made in it (nothing once
        committed)."""
        if not self._committed and self._parent_fd >= 0:
            _remove_partial(self._parent_fd, self._partial, self.fd)

    def close(self) -> None:
        """Close every fd held here (the files', the directory's, the parent's)."""
        files, self._files = self._files, None
        for fd in (() if files is None else (files.state_fd, files.memory_fd)):
            os.close(fd)
        for fd in (self.fd, self._parent_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._parent_fd = -1

    def __enter__(self) -> PartialSnapshot:
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.discard()
        finally:
            self.close()


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
        for file_name in (MEMORY_FILE_NAME, STATE_FILE_NAME, *_HANDED_OUT.values()):
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
