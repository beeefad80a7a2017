"""The ``snapshot`` group: saving a paused test guest to files and bringing it back, avmm
against QEMU microvm, for guests of each size in ``Params.snapshot_mib``, with guest RAM
untouched (as the test guest leaves it: a few MiB written) and touched (every page from
4 MiB to the end written before the snapshot).

The guest is the test guest's ``count`` scenario with a huge N: a ring-3 loop that bumps
the mailbox counter (guest physical 0x200008) every 2^20 iterations (well under a
millisecond of guest time), so "the restored guest runs" is visible from outside within
about that long. Touched RAM is written by this program (1 MiB random blocks, each page
stamped with its number) while the VM is paused: to the snapshot it is the same as RAM a
guest wrote, and the restore checks sampled pages of it afterwards.

avmm: ``VirtualMachine``, ``await vm.pause()``, ``await vm.snapshot(dir)`` (state file +
sparse memory file, fsynced); restore with ``VirtualMachine.restore(dir)`` in this
running process, and with ``avmm up --restore DIR`` as a fresh process.

QEMU (its default anonymous guest RAM): QMP ``stop``, ``migrate fd:`` to a file (the
classic "migrate to file" recipe; QEMU 7.2 has no ``file:`` URI and ``savevm`` needs a
qcow2 disk) with the migration's bandwidth limit lifted, then ``fsync`` of that file,
which avmm's snapshot does too; restore with ``-incoming defer``, QMP
``migrate-incoming fd:N`` on that file and ``cont`` once its MIGRATION ``completed``
event came (a stopped VM's stream restores paused).

Figures, per size and touched/untouched:

* save time: the snapshot call on the already paused VM until the files are written and
  fsynced (avmm: ``vm.snapshot()``; QEMU: ``migrate`` until its MIGRATION ``completed``
  event, plus the ``fsync``);
* size: bytes written (avmm: state file + memory file's data, its holes not counted;
  QEMU: the migration stream), and disk space allocated (``st_blocks``) for the files;
* restore latency: from the start of the restore (the ``VirtualMachine.restore()`` call,
  with guest RAM mapped from the memory file or, with ``copy_memory=True``, copied; or
  the process's fork for ``avmm up --restore`` and QEMU) until the guest's mailbox
  counter moves past the value it held in the snapshot, read from guest RAM (this
  process's view for the in-process VM, ``/proc/PID/mem`` for processes) every 0.2 ms:
  the time to the first guest instruction plus at most one 2^20-iteration chunk of guest
  time (about 0.3 ms on the development machine) and one poll. Snapshot files live in
  /dev/shm (tmpfs), so this measures the VMMs, not a disk.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    AVMM,
    IN_PROCESS,
    PER_OPERATION,
    WHOLE_PROCESS,
    BenchError,
    Figure,
    avmm_config,
    end_process,
    log,
    qemu_argv,
    scratch_dir,
)
from benchmarks.memchild import MAILBOX_ADDRESS, MAILBOX_MAGIC, SPIN_N
from benchmarks.qmp import Qmp
from benchmarks.qmp import connect as qmp_connect

SPIN = f"avmm.test=count avmm.n={SPIN_N}"
MIB = 1 << 20
PAGE = 4096
#: Touched RAM starts here: below it sit the test guest's image, stack and mailbox.
TOUCH_START = 4 * MIB
#: Pages of touched RAM compared after each restore (first, last, spread between).
CHECKED_PAGES = 64
TIMEOUT_S = 120.0
POLL_S = 0.0002
#: QEMU's max-bandwidth for the save: no limit that a file on tmpfs could reach.
UNLIMITED_BPS = 1 << 40


# -- guest RAM from outside ----------------------------------------------------------------


def fill_block(offset: int, seed: bytes) -> bytes:
    """The 1 MiB written at guest address ``offset`` (MiB aligned) of touched RAM:
    ``seed`` (1 MiB of random bytes, one per run) with every page's first 8 bytes set to
    its page number, so no two pages are alike."""
    block = bytearray(seed)
    for page in range(MIB // PAGE):
        block[page * PAGE:page * PAGE + 8] = ((offset // PAGE) + page).to_bytes(8, "little")
    return bytes(block)


def sample_pages(memory_bytes: int) -> list[int]:
    """Guest addresses of the touched pages compared after a restore."""
    pages = (memory_bytes - TOUCH_START) // PAGE
    step = max(1, pages // CHECKED_PAGES)
    return sorted({TOUCH_START + PAGE * p for p in [*range(0, pages, step), pages - 1]})


def expected_page(address: int, seed: bytes) -> bytes:
    start = address % MIB
    page = bytearray(seed[start:start + PAGE])
    page[:8] = (address // PAGE).to_bytes(8, "little")
    return bytes(page)


class ProcessRam:
    """Guest RAM of another process (an ``avmm up`` or QEMU process this program started),
    through ``/proc/PID/mem``: found as the mapping of exactly the guest's RAM size whose
    mailbox page holds the test guest's magic. Both VMMs keep the guest's RAM below 3 GiB
    in one mapping that stays at one address (avmm maps a snapshot's memory file over its
    own mapping, QEMU loads into its anonymous RAM)."""

    def __init__(self, pid: int, memory_bytes: int) -> None:
        self.pid = pid
        self.memory_bytes = memory_bytes
        self.base: int | None = None
        # Opened once the RAM is found: an fd on /proc/PID/mem is bound to the address
        # space it was opened on, which the process's exec replaces.
        self._fd: int | None = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _candidates(self) -> list[int]:
        found = []
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start == self.memory_bytes and fields[1].startswith("rw"):
                    found.append(start)
        return found

    def mailbox(self) -> tuple[int, int] | None:
        """(magic, counter) of the guest's mailbox, or None while no mapping holds it."""
        if self._fd is not None and self.base is not None:
            words = os.pread(self._fd, 16, self.base + MAILBOX_ADDRESS)
            return int.from_bytes(words[:8], "little"), int.from_bytes(words[8:], "little")
        bases = self._candidates()
        if not bases:
            return None
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        for base in bases:
            try:
                words = os.pread(fd, 16, base + MAILBOX_ADDRESS)
            except OSError:
                continue
            magic = int.from_bytes(words[:8], "little")
            if magic == MAILBOX_MAGIC:
                self.base, self._fd = base, fd
                return magic, int.from_bytes(words[8:], "little")
        os.close(fd)
        return None

    def read(self, address: int, length: int) -> bytes:
        assert self._fd is not None and self.base is not None
        return os.pread(self._fd, length, self.base + address)

    def write(self, address: int, data: bytes) -> None:
        assert self._fd is not None and self.base is not None
        if os.pwrite(self._fd, data, self.base + address) != len(data):
            raise BenchError(f"short write to guest RAM of process {self.pid}")


def wait_counter(read: Any, above: int, what: str, process: subprocess.Popen[bytes] | None = None,
                 ) -> None:
    """Poll ``read()`` ((magic, counter) or None) until the counter exceeds ``above``."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        box = read()
        if box is not None and box[1] > above:
            return
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what}: the process exited {process.returncode}: "
                             f"{_stderr(process)!r}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the guest's counter never passed {above}")
        time.sleep(POLL_S)


def _stderr(process: subprocess.Popen[bytes]) -> str:
    with contextlib.suppress(Exception):
        if process.poll() is None:
            process.kill()
        return process.communicate(timeout=10)[1].decode(errors="replace")[-2000:]
    return ""


def allocated(paths: list[Path]) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


# -- one measurement ----------------------------------------------------------------------


@dataclass
class Saved:
    """A snapshot taken: what it cost and where it is."""

    path: Path
    seconds: float
    bytes_written: int
    bytes_allocated: int
    counter: int  # the guest's mailbox counter in the snapshot


@dataclass(frozen=True)
class Case:
    memory_mib: int
    touched: bool

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def label(self) -> str:
        ram = (f"touched RAM ({self.memory_mib - TOUCH_START // MIB} MiB written)"
               if self.touched else "untouched RAM")
        return f"{self.memory_mib} MiB guest, {ram}"


def check_pages(read: Any, case: Case, seed: bytes, what: str) -> None:
    """The restored guest's touched pages are the ones written before the snapshot."""
    if not case.touched:
        return
    for address in sample_pages(case.memory_bytes):
        if bytes(read(address, PAGE)) != expected_page(address, seed):
            raise BenchError(f"{what}: guest page 0x{address:x} differs after the restore")


# -- avmm ---------------------------------------------------------------------------------


async def _avmm_save(case: Case, directory: Path, seed: bytes) -> Saved:
    from avmm import VirtualMachine

    config = avmm_config(SPIN, memory_mib=case.memory_mib, name="snap")
    async with VirtualMachine(config) as vm:  # type: ignore[arg-type]
        memory = vm.memory
        assert memory is not None

        def box() -> tuple[int, int] | None:
            magic = memory.read_u64(MAILBOX_ADDRESS)
            return (magic, memory.read_u64(MAILBOX_ADDRESS + 8)) if magic == MAILBOX_MAGIC else None

        await _poll_async(box, 0, "avmm boot")
        await vm.pause()
        counter = memory.read_u64(MAILBOX_ADDRESS + 8)
        if case.touched:
            for offset in range(TOUCH_START, case.memory_bytes, MIB):
                memory.write(offset, fill_block(offset, seed))
        start = time.perf_counter()
        info = await vm.snapshot(directory)
        seconds = time.perf_counter() - start
        vm.stop("snapshot taken")
    files = [p for p in directory.iterdir() if p.is_file()]
    return Saved(directory, seconds, info.bytes_state + info.bytes_memory, allocated(files),
                 counter)


async def _poll_async(read: Any, above: int, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        box = read()
        if box is not None and box[1] > above:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the guest's counter never passed {above}")
        await trio.sleep(POLL_S)


async def _avmm_restore_in_process(case: Case, saved: Saved, seed: bytes, *,
                                   copy_memory: bool = False) -> float:
    """Seconds from ``VirtualMachine.restore()`` to the guest's counter moving on."""
    from avmm import VirtualMachine

    start = time.perf_counter()
    async with VirtualMachine.restore(saved.path, copy_memory=copy_memory) as vm:
        memory = vm.memory
        assert memory is not None

        def box() -> tuple[int, int] | None:
            magic = memory.read_u64(MAILBOX_ADDRESS)
            return (magic, memory.read_u64(MAILBOX_ADDRESS + 8)) if magic == MAILBOX_MAGIC else None

        await _poll_async(box, saved.counter, "VirtualMachine.restore()")
        seconds = time.perf_counter() - start
        check_pages(memory.view, case, seed, "VirtualMachine.restore()")
        vm.stop("measured")
    return seconds


def _process_restore(argv: list[str], case: Case, saved: Saved, seed: bytes, what: str,
                     then: Any = None, **popen: Any) -> float:
    """Seconds from starting ``argv`` (a VMM process restoring ``saved``) to its guest's
    counter moving on; ``then(process)`` runs once the guest's RAM holds the snapshot
    (QEMU's ``cont``)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, **popen)
    ram = None
    try:
        ram = ProcessRam(process.pid, case.memory_bytes)
        if then is not None:
            then(process)
        wait_counter(ram.mailbox, saved.counter, what, process)
        seconds = time.perf_counter() - start
        check_pages(ram.read, case, seed, what)
        return seconds
    finally:
        if ram is not None:
            ram.close()
        end_process(process)


# -- QEMU ---------------------------------------------------------------------------------


def _qemu_argv(case: Case, qmp: Path) -> list[str]:
    return [*qemu_argv(SPIN, memory_mib=case.memory_mib),
            "-qmp", f"unix:{qmp},server=on,wait=off"]


def _connect(path: Path, process: subprocess.Popen[bytes]) -> Qmp:
    return qmp_connect(path, process, timeout_s=TIMEOUT_S, poll_s=POLL_S)


def _qemu_save(case: Case, path: Path, qmp: Path, seed: bytes) -> Saved:
    qmp.unlink(missing_ok=True)
    process = subprocess.Popen(_qemu_argv(case, qmp), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ram = None
    try:
        ram = ProcessRam(process.pid, case.memory_bytes)
        wait_counter(ram.mailbox, 0, "QEMU boot", process)
        with _connect(qmp, process) as monitor:
            monitor.command("stop")
            box = ram.mailbox()
            assert box is not None
            if case.touched:
                for offset in range(TOUCH_START, case.memory_bytes, MIB):
                    ram.write(offset, fill_block(offset, seed))
            monitor.command("migrate-set-capabilities",
                            capabilities=[{"capability": "events", "state": True}])
            # Migration is rate-limited (128 MiB/s by default); a save to a file is not
            # (what `virsh save` does too).
            monitor.command("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BPS})
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                monitor.command("getfd", fds=[fd], fdname="snapshot")
                start = time.perf_counter()
                monitor.command("migrate", uri="fd:snapshot")
                monitor.wait_event("MIGRATION", data={"status": "completed"},
                                   timeout_s=TIMEOUT_S)
                os.fsync(fd)
                seconds = time.perf_counter() - start
            finally:
                os.close(fd)
            monitor.command("quit")
        return Saved(path, seconds, os.stat(path).st_size, allocated([path]), box[1])
    finally:
        if ram is not None:
            ram.close()
        end_process(process)


def _qemu_restore(case: Case, saved: Saved, qmp: Path, seed: bytes) -> float:
    """A QEMU process started with ``-incoming defer``, told over QMP to load the file
    (an fd it inherited) and, once its MIGRATION ``completed`` event came, to ``cont``:
    events instead of polling, so that nothing here slows its loading down."""
    qmp.unlink(missing_ok=True)
    fd = os.open(saved.path, os.O_RDONLY | os.O_CLOEXEC)

    def load_and_cont(process: subprocess.Popen[bytes]) -> None:
        with _connect(qmp, process) as monitor:
            monitor.command("migrate-set-capabilities",
                            capabilities=[{"capability": "events", "state": True}])
            monitor.command("migrate-incoming", uri=f"fd:{fd}")
            monitor.wait_event("MIGRATION", data={"status": "completed"},
                               timeout_s=TIMEOUT_S)
            status = monitor.command("query-status")["status"]
            if status != "paused":
                raise BenchError(f"QEMU -incoming ended in state {status!r}")
            monitor.command("cont")

    try:
        return _process_restore([*_qemu_argv(case, qmp), "-incoming", "defer"], case, saved,
                                seed, "QEMU -incoming", then=load_and_cont, pass_fds=[fd])
    finally:
        os.close(fd)


# -- the group ----------------------------------------------------------------------------


@dataclass
class CaseFigures:
    save: Figure
    written: Figure
    allocated: Figure
    up: Figure
    in_process: Figure
    copied: Figure

    def all(self) -> list[Figure]:
        return [self.save, self.written, self.allocated, self.up, self.in_process,
                self.copied]


def _figures(case: Case) -> CaseFigures:
    label = case.label
    qemu = "QEMU: stop, migrate fd: to a file, fsync"
    restore = "QEMU: a process with -incoming defer, migrate-incoming fd: on the file, cont"
    return CaseFigures(
        save=Figure(f"snapshot: save a paused VM, {label}", "ms", "lower", PER_OPERATION,
                    note=f"avmm: vm.snapshot() to /dev/shm; {qemu}"),
        written=Figure(f"snapshot: bytes written, {label}", "MiB", "lower", PER_OPERATION,
                       note="avmm: state file + memory file data (holes not counted); "
                            "QEMU: the migration stream"),
        allocated=Figure(f"snapshot: space allocated on disk, {label}", "MiB", "lower",
                         PER_OPERATION, note="st_blocks of the snapshot's files on tmpfs"),
        up=Figure(f"restore: `avmm up --restore` process → guest runs, {label}", "ms",
                  "lower", WHOLE_PROCESS,
                  note=f"fork → the guest's mailbox counter moves on (avmm: Python start-up "
                       f"and imports included, as in the start-up figures); {restore}"),
        in_process=Figure(f"restore: VirtualMachine.restore() in a running process → guest "
                          f"runs, {label}", "ms", "lower", IN_PROCESS,
                          note=f"restore() call → the guest's mailbox counter moves on; "
                               f"guest RAM mapped copy-on-write from the memory file; "
                               f"{restore}"),
        copied=Figure(f"restore: VirtualMachine.restore(copy_memory=True) in a running "
                      f"process → guest runs, {label}", "ms", "lower", IN_PROCESS,
                      note=f"as above, guest RAM copied (and its digest checked) before the "
                           f"guest runs, as QEMU loads all of it; {restore}"),
    )


def _one_run(case: Case, figures: CaseFigures) -> None:
    seed = os.urandom(MIB)
    with scratch_dir("avmm-bench-snap-") as scratch:
        qmp = scratch / "qmp.sock"
        a = trio.run(_avmm_save, case, scratch / "avmm", seed)
        q = _qemu_save(case, scratch / "qemu.mig", qmp, seed)
        figures.save.add(a.seconds * 1e3, q.seconds * 1e3)
        figures.written.add(a.bytes_written / MIB, q.bytes_written / MIB)
        figures.allocated.add(a.bytes_allocated / MIB, q.bytes_allocated / MIB)
        q_restore = _qemu_restore(case, q, qmp, seed)
        up = _process_restore([str(AVMM), "up", "--restore", str(a.path)], case, a, seed,
                              "avmm up --restore")
        in_process = trio.run(_avmm_restore_in_process, case, a, seed)
        copied = trio.run(functools.partial(_avmm_restore_in_process, case, a, seed,
                                            copy_memory=True))
        figures.up.add(up * 1e3, q_restore * 1e3)
        figures.in_process.add(in_process * 1e3, q_restore * 1e3)
        figures.copied.add(copied * 1e3, q_restore * 1e3)


def bench_snapshot(runs: int, sizes_mib: tuple[int, ...]) -> list[Figure]:
    """Save and restore of the ``count`` guest for each size, untouched and touched."""
    figures = []
    for memory_mib in sizes_mib:
        for touched in (False, True):
            case = Case(memory_mib, touched)
            case_figures = _figures(case)
            for _ in range(runs):
                _one_run(case, case_figures)
            log(f"benchmarks: snapshot {case.label} done")
            figures += case_figures.all()
    return figures
