"""Guest RAM in a snapshot: a sparse file written from a :class:`~avmm.memory.GuestMemory`
and brought back into one, mapped copy-on-write or copied.

The memory file is the image of the guest memory's memfd: byte ``o`` of the file is
byte ``o`` of the memfd, so each region sits at its ``file_offset`` and the file is
exactly ``memory.size`` bytes long. Pages that are all zero are holes (never written:
the writer seeks over them), so a guest that touched little RAM makes a small file.

Integrity: :attr:`MemoryImage.sha256` is the SHA-256 of, for every maximal run of
non-zero 4 KiB pages in file order, the run's offset and length (two little-endian
u64) followed by its bytes. It does not depend on where the file system keeps holes,
so the reader checks it over the data it finds with SEEK_DATA/SEEK_HOLE.

Restore maps the file ``MAP_PRIVATE | MAP_FIXED`` over the guest memory's own mapping
(:func:`map_memory_file`): the guest's pages come from the file on first touch and are
copied only when written, so nothing is read up front, and every address the VM already
handed out (KVM memory slots, device views) stays valid. The memfd then no longer
holds guest RAM: :func:`is_memfd_backed` says so, and a VM must not hand that fd to a
vhost-user back-end (copy the memory instead: :func:`copy_memory_file`). The file must
stay unchanged while such a VM runs (truncating it would fault the guest).

Everything here blocks (file I/O): call it from a worker thread, not the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import stat
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from ._errors import SnapshotError
from .codec import U64

PAGE_SIZE = 4096
#: How much is read at a time when looking for non-zero pages.
SCAN_CHUNK = 1 << 20
#: The most written or read with one system call.
IO_CHUNK = 64 << 20
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_CHUNK = bytes(SCAN_CHUNK)
_RUN_HEADER = struct.Struct("<QQ")


class GuestRam(Protocol):
    """What this module needs of :class:`avmm.memory.GuestMemory`."""

    size: int
    fd: int
    host_base: int

    @property
    def regions(self) -> Sequence[_Region]: ...

    def view(self, address: int, length: int) -> memoryview: ...


class _Region(Protocol):
    guest_address: int
    size: int
    file_offset: int


@dataclass(frozen=True)
class MemoryRegionImage:
    """Where a region of guest RAM lies in the memory file."""

    guest_address: U64
    size: U64
    file_offset: U64


@dataclass(frozen=True)
class MemoryImage:
    """The memory file of a snapshot, as recorded in its state file."""

    STATE_VERSION: ClassVar[int] = 1

    #: The file's name inside the snapshot directory.
    file: str
    #: Its length, the guest memory's size.
    size: U64
    regions: list[MemoryRegionImage]
    #: Bytes in non-zero pages (what the file holds besides holes).
    data_bytes: U64
    #: See the module docstring.
    sha256: bytes


# Guest memories whose mapping is a snapshot's memory file, not their memfd.
_mapped_from_file: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def is_memfd_backed(memory: GuestRam) -> bool:
    """False once :func:`map_memory_file` put a file under ``memory``: its fd no longer
    holds the guest's RAM (no vhost-user sharing, no SEEK_DATA on it)."""
    return memory not in _mapped_from_file


def layout_of(memory: GuestRam) -> list[MemoryRegionImage]:
    return [MemoryRegionImage(r.guest_address, r.size, r.file_offset) for r in memory.regions]

# -- finding data ------------------------------------------------------------------------


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``fd`` that may hold data (SEEK_DATA/SEEK_HOLE); the
    whole file where the file system cannot tell."""
    ranges = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here on
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return ranges


def _page_ranges(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The ranges widened to whole pages."""
    for start, end in ranges:
        yield start - start % PAGE_SIZE, -(-end // PAGE_SIZE) * PAGE_SIZE


def nonzero_runs(read: Callable[[int, int], bytes | memoryview],
                 ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal runs ``(offset, length)`` of pages that are not all zero, within
    ``ranges`` (page-aligned, ascending), reading with ``read(offset, length)``."""
    runs: list[tuple[int, int]] = []
    run_start = run_end = -1
    for start, end in ranges:
        for chunk_start in range(start, end, SCAN_CHUNK):
            length = min(SCAN_CHUNK, end - chunk_start)
            chunk = read(chunk_start, length)
            # bytes.startswith is one memcmp, with no copy of a memoryview (whose own
            # == compares item by item, about 20 times slower).
            if _ZERO_CHUNK.startswith(chunk):
                continue
            for page in range(0, length, PAGE_SIZE):
                if _ZERO_PAGE.startswith(chunk[page:page + PAGE_SIZE]):
                    continue
                offset = chunk_start + page
                if offset == run_end:
                    run_end += PAGE_SIZE
                else:
                    if run_end > run_start >= 0:
                        runs.append((run_start, run_end - run_start))
                    run_start, run_end = offset, offset + PAGE_SIZE
    if run_end > run_start >= 0:
        runs.append((run_start, run_end - run_start))
    return runs


def _digest(runs: Iterable[tuple[int, int]],
            pieces: Callable[[int, int], Iterator[memoryview | bytes]]) -> bytes:
    digest = hashlib.sha256()
    for offset, length in runs:
        digest.update(_RUN_HEADER.pack(offset, length))
        for piece in pieces(offset, length):
            digest.update(piece)
    return digest.digest()

# -- guest memory as a linear file ------------------------------------------------------


def _memory_pieces(memory: GuestRam, offset: int, length: int) -> Iterator[memoryview]:
    """Views of the guest memory for file offsets ``[offset, offset + length)``, at most
    :data:`IO_CHUNK` bytes each."""
    end = offset + length
    for region in memory.regions:
        start = max(offset, region.file_offset)
        stop = min(end, region.file_offset + region.size)
        for piece in range(start, stop, IO_CHUNK):
            piece_end = min(piece + IO_CHUNK, stop)
            yield memory.view(region.guest_address + piece - region.file_offset,
                              piece_end - piece)


def _check_layout(memory: GuestRam) -> None:
    offset = 0
    for region in sorted(memory.regions, key=lambda r: r.file_offset):
        if region.file_offset != offset or region.size % PAGE_SIZE:
            raise SnapshotError("guest memory regions do not tile the memfd in whole pages")
        offset += region.size
    if offset != memory.size:
        raise SnapshotError("guest memory regions do not cover the memfd")


def _memory_reader(memory: GuestRam) -> Callable[[int, int], bytes | memoryview]:
    """Guest RAM by file offset: a view of it (no copy) where the range lies in one
    region, as a scan chunk nearly always does; joined bytes across regions."""
    def read(offset: int, length: int) -> bytes | memoryview:
        pieces = list(_memory_pieces(memory, offset, length))
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(bytes(view) for view in pieces)

    return read

# -- writing -----------------------------------------------------------------------------


def write_memory_file(memory: GuestRam, path: Path | str, *,
                      dir_fd: int | None = None) -> MemoryImage:
    """Write ``memory`` to a new file ``path`` (relative to ``dir_fd`` if given; sparse,
    fsynced; never through a symlink) and describe it. The guest must not run
    meanwhile."""
    path = Path(path)
    _check_layout(memory)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        return write_memory_fd(memory, fd, file_name=path.name)
    finally:
        os.close(fd)


def write_memory_fd(memory: GuestRam, fd: int, *, file_name: str) -> MemoryImage:
    """Write ``memory`` into the open regular file ``fd`` (which stays open) and fsync
    it: the file becomes exactly the image (truncated first, so that its holes are holes
    whatever it held), sparse as :func:`write_memory_file` makes it. ``file_name`` is
    its name in the snapshot directory, as the state file records it. Needs only
    fstat, ftruncate, pwrite and fsync on ``fd`` (a jailed worker is handed such a
    file, never its directory). The guest must not run meanwhile."""
    _check_layout(memory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise SnapshotError(f"{file_name}: the memory file to write is not a regular file")
    size = memory.size
    candidates = data_ranges(memory.fd, size) if is_memfd_backed(memory) else [(0, size)]
    runs = nonzero_runs(_memory_reader(memory), _page_ranges(candidates))
    os.ftruncate(fd, 0)
    # The digest is taken in a thread of its own while this one writes: both read the
    # same (paused) guest RAM, and hashlib and pwrite(2) let go of the GIL on big
    # pieces, so the SHA-256 (the larger part: about 1 GB/s here, against 3 for
    # writing to tmpfs) no longer adds to the writing. It is joined before this
    # returns, also when writing fails (told to stop at its next piece first): nothing
    # reads guest RAM once this returns. Where no thread can be started (a task limit),
    # the digest is taken here after the writing, as it was before.
    digest = _DigestThread(memory, runs)
    try:
        for offset, length in runs:
            position = offset
            for view in _memory_pieces(memory, offset, length):
                _write_all(fd, view, position)
                position += len(view)
    except BaseException:
        digest.abandon()
        raise
    sha256 = digest.result()
    os.ftruncate(fd, size)  # the holes up to the end
    os.fsync(fd)
    return MemoryImage(file=file_name, size=size, regions=layout_of(memory),
                       data_bytes=sum(length for _, length in runs), sha256=sha256)


class _DigestStopped(Exception):
    """The writing failed: the digest thread leaves its work at the next piece."""


class _DigestThread:
    """The SHA-256 of ``runs`` of ``memory`` (as :func:`_digest` takes it), taken in a
    thread of its own from construction; :meth:`result` waits for it, :meth:`abandon`
    stops it at its next piece (at most :data:`IO_CHUNK` bytes) and waits."""

    def __init__(self, memory: GuestRam, runs: list[tuple[int, int]]) -> None:
        self._memory, self._runs = memory, runs
        self._stop = threading.Event()
        self._outcome: bytes | BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._body, name="avmm snapshot digest", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # "can't start new thread": taken inline by result()
            self._thread = None

    def _pieces(self, offset: int, length: int) -> Iterator[memoryview]:
        for view in _memory_pieces(self._memory, offset, length):
            if self._stop.is_set():
                raise _DigestStopped
            yield view

    def _body(self) -> None:
        try:
            self._outcome = _digest(self._runs, self._pieces)
        except BaseException as e:  # handed to result(); a stop is not an error
            self._outcome = None if isinstance(e, _DigestStopped) else e

    def abandon(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._outcome = None  # a failure of its own must not replace the caller's

    def result(self) -> bytes:
        if self._thread is None:
            return _digest(self._runs, self._pieces)  # inline: nothing sets the stop
        self._thread.join()
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            try:
                raise outcome
            finally:
                del outcome  # no cycle through this frame keeping guest RAM's views
        assert outcome is not None
        return outcome


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written

# -- reading -----------------------------------------------------------------------------


@contextlib.contextmanager
def _opened_checked(source: Path | int, name: Path | None, memory: GuestRam,
                    image: MemoryImage) -> Iterator[tuple[int, Path]]:
    """The memory file as an fd (and its name for messages), checked against the state
    file and the new memory. ``source``: an fd that stays open (the one
    :func:`avmm.state.snapshot.read_snapshot` opened and checked), or a path opened here
    (not blocking, a regular file required) and closed afterwards."""
    path = name if name is not None else (source if isinstance(source, Path)
                                          else Path(f"/proc/self/fd/{source}"))
    if image.size != memory.size:
        raise SnapshotError(f"{path}: the snapshot's guest has {image.size} bytes of RAM; "
                            f"the VM being restored has {memory.size}")
    if image.regions != layout_of(memory):
        raise SnapshotError(f"{path}: the snapshot's RAM layout does not match the VM's")
    if isinstance(source, int):
        fd, owned = source, False
    else:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotError(f"{path}: the snapshot's memory file is missing") from None
        except OSError as e:
            raise SnapshotError(f"{path}: cannot open the memory file: {e.strerror}") \
                from None
        owned = True
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path}: the memory file is not a regular file")
        if info.st_size != image.size:
            raise SnapshotError(f"{path}: the memory file has {info.st_size} bytes, the "
                                f"snapshot recorded {image.size} (truncated or replaced?)")
        yield fd, path
    finally:
        if owned:
            os.close(fd)


def _file_reader(fd: int) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise SnapshotError("the memory file changed size while it was read")
        return data

    return read


def _check_digest(path: Path, image: MemoryImage,
                  read: Callable[[int, int], bytes | memoryview],
                  ranges: list[tuple[int, int]]) -> None:
    runs = nonzero_runs(read, _page_ranges(ranges))

    def pieces(offset: int, length: int) -> Iterator[bytes | memoryview]:
        for piece in range(offset, offset + length, IO_CHUNK):
            yield read(piece, min(IO_CHUNK, offset + length - piece))

    if _digest(runs, pieces) != image.sha256:
        raise SnapshotError(f"{path}: the memory file is corrupt (its SHA-256 does not "
                            "match the state file)")


def copy_image_file(source: int, target: int, image: MemoryImage, *, name: str) -> None:
    """Copy the memory file ``source`` (open for reading; written by someone else, who
    may still hold it open for writing) into the new empty file ``target``, sparse, and
    check that what was copied is the image ``image`` describes: its size, its data
    bytes and its SHA-256, computed over the bytes written to ``target`` (so a source
    changed during the copy fails the check). fsyncs ``target``.

    :raises SnapshotError: the source is not that image.
    """
    size = os.fstat(source).st_size
    if size != image.size:
        raise SnapshotError(f"{name}: the memory file is {size} bytes, the state file "
                            f"records {image.size}")
    read = _file_reader(source)
    runs = nonzero_runs(read, _page_ranges(data_ranges(source, size)))

    def copied(offset: int, length: int) -> Iterator[bytes]:
        # What is hashed is what was written: a source changed meanwhile fails.
        for piece in range(offset, offset + length, IO_CHUNK):
            data = read(piece, min(IO_CHUNK, offset + length - piece))
            _write_all(target, memoryview(data), piece)
            yield data

    digest = _digest(runs, copied)
    os.ftruncate(target, size)
    if digest != image.sha256 or sum(n for _, n in runs) != image.data_bytes:
        raise SnapshotError(f"{name}: the memory file does not match the state file (its "
                            "SHA-256 or its data differ; was it written to meanwhile?)")
    os.fsync(target)


def copy_memory_file(source: Path | int, memory: GuestRam, image: MemoryImage, *,
                     verify: bool, name: Path | None = None) -> None:
    """Read the memory file (a path, or an open fd that stays open) into ``memory``
    (fresh: all zero), skipping its holes; with ``verify``, check its digest over what
    was read. ``name`` names an fd in messages."""
    with _opened_checked(source, name, memory, image) as (fd, path):
        ranges = data_ranges(fd, image.size)
        for start, end in ranges:
            position = start
            for view in _memory_pieces(memory, start, end - start):
                while view:
                    got = os.preadv(fd, [view], position)
                    if got <= 0:
                        raise SnapshotError(f"{path}: the memory file ended early")
                    view = view[got:]
                    position += got
        if verify:
            _check_digest(path, image, _memory_reader(memory), ranges)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def map_memory_file(source: Path | int, memory: GuestRam, image: MemoryImage, *,
                    verify: bool, name: Path | None = None) -> None:
    """Put the memory file (a path, or an open fd that stays open) under ``memory``'s
    mapping, ``MAP_PRIVATE`` (copy-on-write), in place: the same addresses, now backed
    by the file. Call it before the memory is registered with KVM. With ``verify``, the
    file's digest is checked first (it reads the file's data once, through the page
    cache, without copying it into the guest). ``name`` names an fd in messages."""
    with _opened_checked(source, name, memory, image) as (fd, path):
        if verify:
            _check_digest(path, image, _file_reader(fd), data_ranges(fd, image.size))
        address = _libc.mmap(memory.host_base, memory.size,
                             mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if address != memory.host_base:
            error = ctypes.get_errno()
            # A failed MAP_FIXED may already have unmapped the range: put the memfd back
            # so that the memory can at least be closed without a fault.
            _libc.mmap(memory.host_base, memory.size, mmap.PROT_READ | mmap.PROT_WRITE,
                       mmap.MAP_SHARED | _MAP_FIXED, memory.fd, 0)
            raise SnapshotError(f"{path}: cannot map the memory file: {os.strerror(error)}")
        # The mapping keeps the file once the fd is closed.
    _mapped_from_file[memory] = str(path)
