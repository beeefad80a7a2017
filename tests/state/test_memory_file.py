"""Guest RAM in a snapshot: a sparse file that maps back copy-on-write or copies, with
the RAM above the 32-bit hole where it belongs, and a digest that catches damage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avmm.memory import GIB, MIB, MMIO_HOLE_END, GuestMemory
from avmm.state import SnapshotError, is_memfd_backed
from avmm.state.memory_file import (
    PAGE_SIZE,
    copy_memory_file,
    data_ranges,
    map_memory_file,
    write_memory_file,
)

#: (guest address, bytes) written before each snapshot: first and last page of low RAM,
#: a run across a 1 MiB scan chunk, a lone byte in an otherwise zero page.
WRITES = [(0, b"first page"), (4 * MIB - 8, b"x" * 16), (2 * MIB + 5, b"\x01"),
          (16 * MIB - PAGE_SIZE, b"\xff" * PAGE_SIZE)]


@pytest.fixture
def memory():
    with GuestMemory(16 * MIB) as memory:
        for address, data in WRITES:
            memory.write(address, data)
        yield memory


def _touched_pages() -> int:
    return len(_touched_page_numbers())


def test_the_file_is_the_memfd_image_with_holes(memory, tmp_path: Path):
    path = tmp_path / "memory.avmm"
    image = write_memory_file(memory, path)
    assert image.size == memory.size == path.stat().st_size
    assert image.data_bytes == _touched_pages() * PAGE_SIZE
    # Only the touched pages take space (tmp_path's file system keeps holes).
    assert path.stat().st_blocks * 512 <= image.data_bytes + 64 * 1024
    with open(path, "rb") as f:
        fd = f.fileno()
        assert sum(end - start for start, end in data_ranges(fd, image.size)) < 2 * MIB
        for address, data in WRITES:
            assert os.pread(fd, len(data), address) == data
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copied"])
def test_memory_comes_back(memory, tmp_path: Path, copy: bool):
    path = tmp_path / "memory.avmm"
    image = write_memory_file(memory, path)
    with GuestMemory(16 * MIB) as restored:
        (copy_memory_file if copy else map_memory_file)(path, restored, image, verify=True)
        assert restored.read(0, 16 * MIB) == memory.read(0, 16 * MIB)
        assert is_memfd_backed(restored) is copy
        # Copy-on-write: the guest's writes stay in the VM, the file is unchanged.
        restored.write(0, b"changed")
        with open(path, "rb") as f:
            assert f.read(10) == b"first page"


def test_a_mapped_memory_snapshots_again_from_its_mapping(memory, tmp_path: Path):
    """The second snapshot of a restored VM must read the guest's pages, not the memfd
    the mapping replaced (which is all zero)."""
    image = write_memory_file(memory, tmp_path / "one")
    with GuestMemory(16 * MIB) as restored:
        map_memory_file(tmp_path / "one", restored, image, verify=True)
        restored.write(8 * MIB, b"written after the restore")
        again = write_memory_file(restored, tmp_path / "two")
        assert again.data_bytes == image.data_bytes + PAGE_SIZE
        with GuestMemory(16 * MIB) as third:
            copy_memory_file(tmp_path / "two", third, again, verify=True)
            assert third.read(0, 16 * MIB) == restored.read(0, 16 * MIB)


def test_ram_above_the_hole_keeps_its_place(tmp_path: Path):
    size = 3 * GIB + 4 * MIB  # 3 GiB below the hole, 4 MiB from 4 GiB on
    with GuestMemory(size) as memory:
        memory.write(MMIO_HOLE_END + 3 * MIB, b"above the hole")
        memory.write(0xBFFF_F000, b"top of low RAM")
        image = write_memory_file(memory, tmp_path / "memory.avmm")
        assert image.data_bytes == 2 * PAGE_SIZE
        assert [r.guest_address for r in image.regions] == [0, MMIO_HOLE_END]
        with GuestMemory(size) as restored:
            map_memory_file(tmp_path / "memory.avmm", restored, image, verify=True)
            assert restored.read(MMIO_HOLE_END + 3 * MIB, 14) == b"above the hole"
            assert restored.read(0xBFFF_F000, 14) == b"top of low RAM"


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copied"])
def test_damage_to_the_memory_file_is_one_line(memory, tmp_path: Path, copy: bool):
    path = tmp_path / "memory.avmm"
    image = write_memory_file(memory, path)
    load = copy_memory_file if copy else map_memory_file

    def refused(target: GuestMemory | None = None) -> str:
        with GuestMemory(16 * MIB) as restored:
            with pytest.raises(SnapshotError) as caught:
                load(path, target or restored, image, verify=True)
            return str(caught.value)

    with open(path, "r+b") as f:  # one bit in the middle of a page of data
        f.seek(4 * MIB - 3)
        byte = f.read(1)
        f.seek(4 * MIB - 3)
        f.write(bytes([byte[0] ^ 0x10]))
    assert refused() == f"{path}: the memory file is corrupt (its SHA-256 does not match " \
                        "the state file)"
    os.truncate(path, 8 * MIB)
    assert refused() == f"{path}: the memory file has {8 * MIB} bytes, the snapshot " \
                        f"recorded {16 * MIB} (truncated or replaced?)"
    path.unlink()
    assert refused() == f"{path}: the snapshot's memory file is missing"
    with GuestMemory(32 * MIB) as bigger, \
            pytest.raises(SnapshotError, match="the VM being restored has 33554432"):
        load(path, bigger, image, verify=True)


def test_a_memory_that_cannot_be_written_leaves_no_file_behind_it_did_not_make(
        memory, tmp_path: Path):
    path = tmp_path / "memory.avmm"
    path.write_bytes(b"already here")
    with pytest.raises(FileExistsError):
        write_memory_file(memory, path)
    assert path.read_bytes() == b"already here"


def _resident_kib(address: int) -> int:
    """Rss of the mapping that starts at ``address``, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                inside = int(first.split("-")[0], 16) == address
            elif inside and first == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


def test_a_mapped_memory_file_is_read_only_where_the_guest_looks(memory, tmp_path: Path):
    """Restore maps the file: no page of it is in the VM's memory until touched."""
    path = tmp_path / "memory.avmm"
    image = write_memory_file(memory, path)
    with GuestMemory(16 * MIB) as restored:
        map_memory_file(path, restored, image, verify=False)
        assert _resident_kib(restored.host_base) == 0
        assert restored.read(4 * MIB - 8, 16) == b"x" * 16  # two pages faulted in
        assert 0 < _resident_kib(restored.host_base) <= 64


def _expected_digest(memory) -> bytes:
    """SHA-256 over each run of non-zero pages (header: offset and length, u64 LE each),
    in file order, computed here independently of avmm's scan."""
    import hashlib
    import struct

    runs: list[tuple[int, int]] = []
    for page in sorted(_touched_page_numbers()):
        if runs and runs[-1][0] + runs[-1][1] == page * PAGE_SIZE:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        else:
            runs.append((page * PAGE_SIZE, PAGE_SIZE))
    expected = hashlib.sha256()
    for offset, length in runs:
        expected.update(struct.pack("<QQ", offset, length))
        expected.update(memory.read(offset, length))
    return expected.digest()


def test_the_digest_is_the_runs_in_order_whatever_thread_takes_it(memory, tmp_path: Path):
    """The digest (taken in a thread of its own while the file is written) is SHA-256
    over each run's header and pages, in file order, as the reader checks it."""
    image = write_memory_file(memory, tmp_path / "memory.avmm")
    assert image.sha256 == _expected_digest(memory)


def test_without_a_thread_the_digest_is_taken_inline(memory, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    from avmm.state import memory_file

    def refuse(self: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(memory_file.threading.Thread, "start", refuse)
    image = write_memory_file(memory, tmp_path / "memory.avmm")
    assert image.sha256 == _expected_digest(memory)
    with GuestMemory(16 * MIB) as restored:
        copy_memory_file(tmp_path / "memory.avmm", restored, image, verify=True)
        assert restored.read(0, 16 * MIB) == memory.read(0, 16 * MIB)


def _no_space(fd: int, data: memoryview, offset: int) -> None:
    raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_no_thread_reading_guest_ram(memory, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    import threading
    import time

    from avmm.state import memory_file

    def slow_digest(*_args: object) -> bytes:
        time.sleep(0.3)  # still hashing when the write fails: the failure must wait
        return bytes(32)

    monkeypatch.setattr(memory_file, "_write_all", _no_space)
    monkeypatch.setattr(memory_file, "_digest", slow_digest)
    with pytest.raises(OSError, match="No space left"):
        write_memory_file(memory, tmp_path / "memory.avmm")
    assert [t.name for t in threading.enumerate() if t.name == "avmm snapshot digest"] == []


def test_a_failed_write_stops_the_digest_at_its_next_piece(memory, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """The writer's failure is reported without waiting for the whole of RAM to be
    hashed: with one piece per page and a slow hash, the digest thread stops early."""
    import hashlib
    import time

    from avmm.state import memory_file

    pieces_hashed = []

    class SlowHash:
        def __init__(self) -> None:
            self._inner = hashlib.sha256()

        def update(self, data: bytes | memoryview) -> None:
            if len(data) == PAGE_SIZE:
                pieces_hashed.append(1)
                time.sleep(0.05)
            self._inner.update(data)

        def digest(self) -> bytes:
            return self._inner.digest()

    monkeypatch.setattr(memory_file, "IO_CHUNK", PAGE_SIZE)
    monkeypatch.setattr(memory_file.hashlib, "sha256", SlowHash)
    monkeypatch.setattr(memory_file, "_write_all", _no_space)
    with pytest.raises(OSError, match="No space left"):
        write_memory_file(memory, tmp_path / "memory.avmm")
    assert len(pieces_hashed) < _touched_pages() - 1


def test_a_failed_write_is_what_the_caller_sees_even_if_the_digest_fails(
        memory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from avmm.state import memory_file

    def broken_digest(*_args: object) -> bytes:
        raise ValueError("the digest broke")

    monkeypatch.setattr(memory_file, "_write_all", _no_space)
    monkeypatch.setattr(memory_file, "_digest", broken_digest)
    with pytest.raises(OSError, match="No space left"):
        write_memory_file(memory, tmp_path / "memory.avmm")


def _touched_page_numbers() -> set[int]:
    pages = set()
    for address, data in WRITES:
        pages.update(range(address // PAGE_SIZE, (address + len(data) - 1) // PAGE_SIZE + 1))
    return pages
