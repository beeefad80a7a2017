"""The ``migration`` group: live migration of the running test guest to a second VMM
process on the same host over a unix socket, avmm against QEMU microvm, for guests of
each size in ``Params.migration_mib``, idle and dirtying memory at a set rate.

* idle: the test guest's ``count`` loop (it writes nothing but its mailbox), with guest
  RAM from 4 MiB to the end filled by this program before the migration (1 MiB random
  blocks, each page stamped with its number, as the snapshot group's "touched" RAM): all
  of RAM must travel, and sampled pages are compared on the destination afterwards.
* dirtying: ``mem-walk`` over RAM from 4 MiB to 8 MiB below the end with
  ``avmm.rate=DIRTY_KIB_S`` (tests/guest/README.md, "mem-walk"): each round rewrites a
  quarter of that range at that rate, paced on the guest's TSC, then checks every word
  of it. The migration starts once the fill is over and round 1's rewrites have begun
  (the first page of round 1 holds its new pattern), and the destination must complete
  a round, which checks every word of the range, before the run counts.

Both VMMs: the source runs the guest; a destination process listens on a unix socket
(avmm: ``benchmarks.migration --receive``, a fresh Python process running
``VirtualMachine.receive("unix:...")``; QEMU: ``-incoming unix:...``); the source migrates
to it (avmm: ``await vm.migrate("unix:...")`` with its default 300 ms downtime budget;
QEMU: QMP ``migrate`` with ``downtime-limit`` 300 ms, the same budget, and its
bandwidth limit lifted, since avmm has none). The run then waits until the guest runs
on the destination: its mailbox counter moves past what it was when the migration
completed (read from guest RAM: this process's view for avmm's child via its report,
``/proc/PID/mem`` for QEMU).

Figures, each as the VMM itself reports it (avmm: ``vm.migration``; QEMU:
``query-migrate``):

* total time: from the start of the migration to its completion on the source (avmm:
  ``total_ms``; QEMU: ``total-time``);
* downtime: how long the guest was paused for the hand-over (avmm: ``downtime_ms``, from
  the pause to the destination's acknowledgement; QEMU: ``downtime``, from its stop to
  the end of the migration on the source, in whole milliseconds: a 0 is taken as 0.5);
* data sent: bytes of the stream (avmm: ``bytes_sent``; QEMU: ``ram.transferred``, the
  RAM part, which is nearly all of it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    PER_OPERATION,
    REPO,
    BenchError,
    Figure,
    avmm_config,
    end_process,
    log,
    qemu_argv,
    quiet_logging,
    scratch_dir,
)
from benchmarks.memchild import MAILBOX_ADDRESS, MAILBOX_MAGIC, SPIN_N
from benchmarks.snapshot import (
    MIB,
    PAGE,
    TOUCH_START,
    ProcessRam,
    _connect,
    _stderr,
    expected_page,
    fill_block,
    sample_pages,
    wait_counter,
)
from benchmarks.stall import StallWatch

#: Offsets in the mailbox page of the ``count`` counter and of ``mem-walk``'s progress
#: word (tests/guest/README.md).
COUNTER_WORD = 8
PROGRESS_WORD = 64
#: The dirty rate of the dirtying guest: KiB/s (mem-walk's ``avmm.rate``).
DIRTY_KIB_S = 32 * 1024
#: The dirtying guest's range: from TOUCH_START to this far below the end of RAM.
DIRTY_TAIL = 4 * MIB
DIRTY_SEED = 1
#: Rounds: as many as mem-walk takes; the guest never gets to the end of them here.
DIRTY_ROUNDS = 65535
DOWNTIME_MS = 300
TIMEOUT_S = 300.0
POLL_S = 0.0005
#: QEMU's max-bandwidth: no limit a unix socket could reach (avmm has no limit).
UNLIMITED_BPS = 1 << 40
#: query-migrate's times are whole milliseconds.
QEMU_RESOLUTION_MS = 1.0
RESULT = "avmm-bench-migration: "
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty: bool

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def dirty_mib(self) -> int:
        return self.memory_mib - (TOUCH_START + DIRTY_TAIL) // MIB

    @property
    def cmdline(self) -> str:
        if self.dirty:
            return (f"avmm.test=mem-walk avmm.mib={self.dirty_mib} avmm.rounds={DIRTY_ROUNDS}"
                    f" avmm.seed={DIRTY_SEED} avmm.base={TOUCH_START:#x}"
                    f" avmm.rate={DIRTY_KIB_S}")
        return f"avmm.test=count avmm.n={SPIN_N}"

    @property
    def label(self) -> str:
        if self.dirty:
            return (f"{self.memory_mib} MiB guest dirtying {DIRTY_KIB_S // 1024} MiB/s "
                    f"(mem-walk over {self.dirty_mib} MiB)")
        return (f"{self.memory_mib} MiB guest, idle "
                f"({self.memory_mib - TOUCH_START // MIB} MiB of RAM written before)")

    @property
    def progress_address(self) -> int:
        """The guest word that moves while the guest runs (benchmarks/stall.py): the
        ``count`` loop's mailbox counter, or ``mem-walk``'s per-page progress word."""
        return MAILBOX_ADDRESS + (PROGRESS_WORD if self.dirty else COUNTER_WORD)

    def round_one_started(self, read_u64: Any) -> bool:
        """The dirtying guest's fill is over and round 1 rewrites pages: page 1 (the
        first page round 1 rewrites) holds round 1's first word."""
        word = _splitmix64((DIRTY_SEED * _GOLDEN + (1 << 48) + PAGE // 8) & _MASK64)
        return bool(read_u64(TOUCH_START + PAGE) == word)


@dataclass
class Migrated:
    total_ms: float
    downtime_ms: float
    bytes_sent: int
    #: The guest-visible downtime (benchmarks/stall.py): the same measure for both VMMs.
    stall_ms: float


def _check_pages(read: Any, case: Case, seed: bytes, what: str) -> None:
    if case.dirty:
        return  # the guest's own round checks every word
    for address in sample_pages(case.memory_bytes):
        if bytes(read(address, PAGE)) != expected_page(address, seed):
            raise BenchError(f"{what}: guest page 0x{address:x} differs after the migration")


def _fill(write: Any, case: Case, seed: bytes) -> None:
    for offset in range(TOUCH_START, case.memory_bytes, MIB):
        write(offset, fill_block(offset, seed))


def _wait(ready: Any, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what}: the process exited {process.returncode}: "
                             f"{_stderr(process)!r}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: timed out")
        time.sleep(POLL_S)


# -- QEMU ---------------------------------------------------------------------------------


def _qemu(case: Case, qmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    qmp.unlink(missing_ok=True)
    argv = [*qemu_argv(case.cmdline, memory_mib=case.memory_mib),
            "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def qemu_migrate(case: Case, scratch: Path, seed: bytes) -> Migrated:
    """QEMU to a ``-incoming unix:`` QEMU; the figures from ``query-migrate``."""
    sock = scratch / "qemu-mig.sock"
    source = _qemu(case, scratch / "qemu-src.qmp")
    destination = None
    rams: list[ProcessRam] = []
    watches: list[StallWatch] = []
    try:
        ram = ProcessRam(source.pid, case.memory_bytes)
        rams.append(ram)
        wait_counter(ram.mailbox, -1, "QEMU boot", source)
        if case.dirty:
            _wait(lambda: case.round_one_started(
                lambda a: int.from_bytes(ram.read(a, 8), "little")), "QEMU mem-walk fill", source)
        else:
            _fill(ram.write, case, seed)
        destination = _qemu(case, scratch / "qemu-dst.qmp", "-incoming", f"unix:{sock}")
        with _connect(scratch / "qemu-dst.qmp", destination) as dst_monitor, \
                _connect(scratch / "qemu-src.qmp", source) as monitor:
            del dst_monitor  # connected: the destination has set up its listener
            _wait(sock.exists, "QEMU -incoming listening", destination)
            monitor.command("migrate-set-capabilities",
                            capabilities=[{"capability": "events", "state": True}])
            monitor.command("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BPS,
                                                         "downtime-limit": DOWNTIME_MS})
            watch = StallWatch([source.pid, destination.pid], case.memory_bytes,
                               case.progress_address)
            watches.append(watch)
            monitor.command("migrate", uri=f"unix:{sock}")
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                info = monitor.command("query-migrate")
                # QEMU sets "completed" a moment before it fills in the times (seen
                # here: total-time 0 with 14 MB sent while stopped): ask again.
                if info.get("status") == "completed":
                    if info.get("total-time"):
                        break
                    deadline = min(deadline, time.monotonic() + 5)
                if info.get("status") in ("failed", "cancelled"):
                    raise BenchError(f"QEMU migration {info.get('status')}: "
                                     f"{info.get('error-desc', info)}")
                if time.monotonic() > deadline:
                    raise BenchError("QEMU migration did not complete in time")
                time.sleep(0.01)
            # QEMU counts whole milliseconds: a downtime under 1 ms reads 0, taken as
            # half its resolution so that the ratio stays defined (the note says so).
            total_ms = float(info.get("total-time", 0))
            downtime_ms = max(float(info.get("downtime", 0)), QEMU_RESOLUTION_MS / 2)
            sent = int(info.get("ram", {}).get("transferred", 0))
            if total_ms <= 0 or sent <= 0:
                raise BenchError(f"QEMU query-migrate has no times: {info}")
            monitor.command("quit")
        arrived = ProcessRam(destination.pid, case.memory_bytes)
        rams.append(arrived)
        _wait(lambda: arrived.mailbox() is not None, "QEMU destination RAM", destination)
        box = arrived.mailbox()
        assert box is not None
        wait_counter(arrived.mailbox, box[1], "QEMU destination runs the guest", destination)
        stall = watches[0].stop()
        _check_pages(arrived.read, case, seed, "QEMU destination")
        return Migrated(total_ms, downtime_ms, sent, stall.longest_ms)
    finally:
        for w in watches:
            w.close()
        for r in rams:
            r.close()
        end_process(source)
        if destination is not None:
            end_process(destination)


# -- avmm ---------------------------------------------------------------------------------


async def _receive(listen: str, case: Case, seed_file: Path | None) -> dict[str, Any]:
    """In the destination process: receive, then wait until the guest's counter moves
    past where it was when the migration completed, and check the sampled pages."""
    from avmm import VirtualMachine
    from avmm.lifecycle import VmState

    async with VirtualMachine.receive(listen) as vm:
        print(RESULT + json.dumps({"listening": True}), flush=True)
        with trio.fail_after(TIMEOUT_S):
            # Received and handed over: the guest runs here now.
            while vm.state is not VmState.RUNNING or vm.memory is None:
                if vm.exit is not None:
                    raise BenchError(f"the incoming VM ended: {vm.exit}")
                await trio.sleep(POLL_S)
            memory = vm.memory
            counter = memory.read_u64(MAILBOX_ADDRESS + 8)
            while not (memory.read_u64(MAILBOX_ADDRESS) == MAILBOX_MAGIC
                       and memory.read_u64(MAILBOX_ADDRESS + 8) > counter):
                if vm.exit is not None:
                    raise BenchError(f"the migrated VM ended: {vm.exit}")
                await trio.sleep(POLL_S)
        if seed_file is not None:
            seed = await trio.Path(seed_file).read_bytes()
            _check_pages(memory.read, case, seed, "avmm destination")
        progress = vm.migration
        vm.stop("measured")
    return {"done": True, "migration": progress.as_dict() if progress else None}


def receive_main(argv: list[str]) -> None:
    """``python -m benchmarks.migration --receive unix:PATH MEMORY_MIB dirty|idle [SEED]``"""
    listen, memory_mib, kind = argv[0], int(argv[1]), argv[2]
    seed_file = Path(argv[3]) if len(argv) > 3 else None
    quiet_logging()
    result = trio.run(_receive, listen, Case(memory_mib, kind == "dirty"), seed_file)
    print(RESULT + json.dumps(result), flush=True)


def _child_line(process: subprocess.Popen[str], what: str, errors: Path) -> dict[str, Any]:
    """The destination's next report line (stdout carries nothing else but warnings)."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(RESULT):
            message: dict[str, Any] = json.loads(line[len(RESULT):])
            return message
    process.wait(timeout=30)
    raise BenchError(f"avmm destination exited {process.returncode} before {what}: "
                     f"{errors.read_text(errors='replace')[-2000:]!r}")


async def _avmm_source(case: Case, to: str, seed: bytes, destination_pid: int,
                       stalls: list[StallWatch]) -> Migrated:
    from avmm import StopReason, VirtualMachine

    config = avmm_config(case.cmdline, memory_mib=case.memory_mib, name="migrate")
    async with VirtualMachine(config) as vm:  # type: ignore[arg-type]
        memory = vm.memory
        assert memory is not None
        with trio.fail_after(TIMEOUT_S):
            while not (memory.read_u64(MAILBOX_ADDRESS) == MAILBOX_MAGIC and (
                    case.round_one_started(memory.read_u64) if case.dirty
                    else memory.read_u64(MAILBOX_ADDRESS + 8) > 0)):
                if vm.exit is not None:
                    raise BenchError(f"avmm source VM ended: {vm.exit}")
                await trio.sleep(POLL_S)
        if not case.dirty:
            _fill(memory.write, case, seed)
        stalls.append(await trio.to_thread.run_sync(
            StallWatch, [os.getpid(), destination_pid], case.memory_bytes,
            case.progress_address))
        progress = await vm.migrate(to, downtime_ms=DOWNTIME_MS)
        result = await vm.wait()
        if result.reason is not StopReason.MIGRATED:
            raise BenchError(f"avmm source ended {result} after migrating")
    if progress.downtime_ms is None:
        raise BenchError(f"avmm migration reported no downtime: {progress}")
    # The guest-visible downtime is known once the destination saw it run (the caller).
    return Migrated(progress.total_ms, progress.downtime_ms, progress.bytes_sent, 0.0)


def avmm_migrate(case: Case, scratch: Path, seed: bytes) -> Migrated:
    """avmm in this process to a fresh ``benchmarks.migration --receive`` process."""
    sock = scratch / "avmm-mig.sock"
    seed_file = scratch / "seed"
    seed_file.write_bytes(seed)
    argv = [sys.executable, "-m", "benchmarks.migration", "--receive", f"unix:{sock}",
            str(case.memory_mib), "dirty" if case.dirty else "idle", str(seed_file)]
    # stderr to a file: nothing reads the child's pipes while this process migrates.
    errors = scratch / "receive.err"
    with open(errors, "wb") as err:
        child = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    stalls: list[StallWatch] = []
    try:
        _child_line(child, "listening", errors)
        migrated = trio.run(_avmm_source, case, f"unix:{sock}", seed, child.pid, stalls)
        done = _child_line(child, "the guest ran on it", errors)
        if not done.get("done"):
            raise BenchError(f"avmm destination: {done}")
        stall = stalls[0].stop()
        child.wait(timeout=60)
        return dataclasses.replace(migrated, stall_ms=stall.longest_ms)
    finally:
        for watch in stalls:
            watch.close()
        if child.poll() is None:
            child.kill()
        child.communicate()


# -- the group ----------------------------------------------------------------------------


@dataclass
class CaseFigures:
    total: Figure
    downtime: Figure
    sent: Figure
    stall: Figure

    def all(self) -> list[Figure]:
        return [self.total, self.downtime, self.stall, self.sent]


def _figures(case: Case) -> CaseFigures:
    how = ("unix socket on this host to a fresh destination process; avmm: vm.migrate() "
           f"(downtime budget {DOWNTIME_MS} ms) to VirtualMachine.receive(); QEMU: QMP "
           f"migrate to -incoming, downtime-limit {DOWNTIME_MS} ms, no bandwidth limit")
    return CaseFigures(
        total=Figure(f"live migration: total time, {case.label}", "ms", "lower",
                     PER_OPERATION, note=f"as each reports it (total_ms, total-time); {how}"),
        downtime=Figure(f"live migration: downtime, {case.label}", "ms", "lower",
                        PER_OPERATION,
                        note=f"as each reports it (downtime_ms, downtime; QEMU's is in "
                             f"whole ms, a 0 counts as 0.5); {how}"),
        stall=Figure(f"live migration: guest-visible downtime, {case.label}", "ms", "lower",
                     PER_OPERATION,
                     note="the same measure for both: the longest stall of the guest's "
                          "progress word, sampled every 0.2 ms in both processes' RAM from "
                          "outside (benchmarks/stall.py); " + how),
        sent=Figure(f"live migration: data sent, {case.label}", "MiB", "lower", PER_OPERATION,
                    note="avmm: bytes_sent (the whole stream); QEMU: ram.transferred"),
    )


def _one_run(case: Case, figures: CaseFigures) -> None:
    seed = os.urandom(MIB)
    with scratch_dir("avmm-bench-mig-") as scratch:
        q = qemu_migrate(case, scratch, seed)
        a = avmm_migrate(case, scratch, seed)
    figures.total.add(a.total_ms, q.total_ms)
    figures.downtime.add(a.downtime_ms, q.downtime_ms)
    figures.stall.add(a.stall_ms, q.stall_ms)
    figures.sent.add(a.bytes_sent / MIB, q.bytes_sent / MIB)


def bench_migration(runs: int, sizes_mib: tuple[int, ...]) -> list[Figure]:
    """Live migration of an idle and of a dirtying guest, for each size."""
    figures = []
    for memory_mib in sizes_mib:
        for dirty in (False, True):
            case = Case(memory_mib, dirty)
            case_figures = _figures(case)
            for _ in range(runs):
                _one_run(case, case_figures)
            log(f"benchmarks: migration {case.label} done")
            figures += case_figures.all()
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] != ["--receive"]:
        sys.exit("usage: python -m benchmarks.migration --receive unix:PATH MEMORY_MIB "
                 "dirty|idle [SEED_FILE] (the avmm destination of the migration group; "
                 "run the group with python -m benchmarks.run --only migration)")
    receive_main(sys.argv[2:])
