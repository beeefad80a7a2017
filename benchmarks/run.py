"""avmm side by side with QEMU microvm on the same machine, KVM and test guest.

    .venv/bin/python -m benchmarks.run [--quick] [--only GROUP ...] [--runs R] [--out DIR]

Groups: exits, startup, blk, blk-vhost, net, net-vhost (QEMU with `avmm backend net`
against QEMU's own virtio-net), churn, memory, snapshot, migration, fairness
(avmm alone against goals: CPU shares and quotas, benchmarks/fairness_cpu.py; a NIC's
frame-rate limits, benchmarks/fairness_net.py; a quiet VM next to a noisy one,
benchmarks/noisy.py; disk rate limiters against their goal beside QEMU's throttling,
benchmarks/fairness_io.py), isolation (one jailed worker per VM against dense mode and
QEMU, benchmarks/isolation.py). Every figure is
measured here and now: for each of R runs (5 by default, 2 with --quick)
avmm and QEMU are measured back to back as a pair. Each figure reports both medians, their
ratio avmm/QEMU, and the range of the per-pair ratios. The figures fall in three parts
(benchmarks.common.PARTS): per operation (like for like), whole processes (``avmm up`` vs
QEMU), and avmm inside a running process vs QEMU processes. The tables (Markdown, with
the commit, machine and date that produced them) go to stdout, the JSON to
``build/bench/`` (``latest.json`` and a timestamped copy); ``python -m benchmarks.report
--write-readme`` puts the tables of ``latest.json`` in README.md.

blk-vhost needs qemu-storage-daemon; net needs root, /dev/net/tun and iproute2 (a tap in
a network namespace, see benchmarks/net.py); snapshot reads the guest RAM of the VMM
processes it starts through /proc/PID/mem (see benchmarks/snapshot.py), and migration
does too (see benchmarks/migration.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from benchmarks.common import (
    GUEST_MEMORY_MIB,
    IN_PROCESS,
    PARTS,
    PER_OPERATION,
    REPO,
    SHM,
    TEST_GUEST,
    WHOLE_PROCESS,
    BenchError,
    Figure,
    Goal,
    Side,
    avmm_run,
    avmm_run_sync,
    avmm_up_argv,
    checked,
    end_process,
    guest_timed_iops,
    log,
    per_unit,
    process_memory,
    process_run,
    qemu_argv,
    qemu_run,
    quiet_logging,
    serving,
    status_of,
    stderr_of,
    tsc_khz,
)
from benchmarks.fairness_cpu import bench_fairness_cpu
from benchmarks.fairness_io import bench_fairness_io
from benchmarks.fairness_net import bench_fairness_net
from benchmarks.isolation import bench_isolation
from benchmarks.memchild import MARKER, SPIN_N
from benchmarks.migration import bench_migration
from benchmarks.net import bench_net, bench_net_vhost
from benchmarks.noisy import bench_noisy_neighbour
from benchmarks.report import markdown, provenance
from benchmarks.snapshot import bench_snapshot

HELLO_TOML = REPO / "examples" / "hello.toml"
HELLO = "console=ttyS0 avmm.test=hello"
HELLO_DONE = "avmm-testguest: cmdline:"
QSD = "qemu-storage-daemon"
_sockets = itertools.count()


@dataclass(frozen=True)
class Params:
    runs: int
    exit_n: int
    blk_n: dict[int, int]   # queue depth → requests
    blk_vhost_n: dict[int, int]
    net_n: int              # frames per net-bench run
    churn_s: float
    memory_vms: tuple[int, ...]  # VMs in one process, each > 1, for the per-VM figures
    blk_image_mib: int = 64
    snapshot_mib: tuple[int, ...] = (128, 1024)  # guest RAM sizes of the snapshot group
    migration_mib: tuple[int, ...] = (128, 1024)  # guest RAM sizes of the migration group
    fairness_window_s: float = 5.0  # CPU time measured over this window (fairness group)
    fairness_s: float = 4.0  # seconds of limited I/O per rate-limit run (past the bucket)
    noisy_n: int = 50_000  # the quiet VM's requests per noisy-neighbour run


# avmm's in-process disk serves 300k-600k requests/s at both depths here since its I/O
# thread's loop runs in C (b8c47b1): 2,000 requests at qd 1 then took ~5 ms, within a
# VM boot's jitter, and per_unit measured pairs again (3 times in a run of 3); these
# counts take avmm 30-300 ms and QEMU 1-1.5 s.
FULL = Params(runs=5, exit_n=20000, blk_n={1: 20000, 32: 100000},
              blk_vhost_n={1: 10000, 32: 40000}, net_n=50000, churn_s=2.0, memory_vms=(10, 50))
# The smoke runs' counts are small, yet each must outlast the jitter of a VM's boot on a
# loaded host (a few ms), or per_unit gives up: 2,000 frames (2 ms at QEMU's and avmm's
# rates here) failed a CI run five times in a row. Those below take avmm 10-150 ms.
QUICK = Params(runs=2, exit_n=2000, blk_n={1: 20000, 32: 50000},
               blk_vhost_n={1: 3000, 32: 10000}, net_n=30000, churn_s=0.3,
               memory_vms=(2, 3),
               snapshot_mib=(16,), migration_mib=(16,), fairness_window_s=1.0,
               fairness_s=0.5, noisy_n=5000)


# -- (a) VM exit round trip -------------------------------------------------------------


@dataclass(frozen=True)
class ExitKind:
    """One ``exit-loop`` kind (tests/guest/scenarios/exit_loop.c) and its table row."""

    kind: str           # avmm.kind=
    counter: str        # the avmm exit counter each access adds to
    label: str
    note: str
    rng: bool = False   # a virtio-rng device in both VMs (kind=virtio reads its registers)


EXIT_KINDS = (
    ExitKind("pio", "IoOut", "pio write, unclaimed port 0x510",
             "no device: both VMMs answer in C (avmm: Vcpu.absorb)"),
    ExitKind("mmio", "MmioWrite", "mmio write, unclaimed address",
             "no device: both VMMs answer in C (avmm: Vcpu.absorb)"),
    ExitKind("uart", "IoOut", "pio write, 16550 scratch register 0x3ff",
             "a device register: avmm's UART model is Python, QEMU's C"),
    ExitKind("virtio", "MmioRead", "mmio read, virtio-mmio Version register (rng)",
             "a device register: avmm's virtio-mmio transport is Python, QEMU's C",
             rng=True),
)
QEMU_RNG = ("-device", "virtio-rng-device")


def bench_exits(p: Params) -> list[Figure]:
    """µs per exit: two runs of ``exit-loop`` per VMM and run, N exits and 0 exits; the
    difference over N cancels boot and teardown. The same guest, N and devices in both
    VMMs; the unclaimed-address rows show the floor, the device-register rows what a
    guest driving a device pays."""
    figures = []
    for spec in EXIT_KINDS:
        figure = Figure(f"exit round trip, {spec.label}", "µs/exit", "lower", PER_OPERATION,
                        note=f"exit-loop kind={spec.kind} n={p.exit_n} minus n=0, wall "
                             f"time; {spec.note}")
        devices = QEMU_RNG if spec.rng else ()

        def cmd(n: int, kind: str = spec.kind) -> str:
            return f"avmm.test=exit-loop avmm.kind={kind} avmm.n={n}"

        done = f"exit-loop kind={spec.kind} n={p.exit_n} done"
        what = f"exit-loop {spec.kind}"

        def avmm_loaded(spec: ExitKind = spec, cmd: Callable[[int], str] = cmd,
                        done: str = done) -> float:
            run = avmm_run_sync(cmd(p.exit_n), rng=spec.rng, expect=done)
            if run.exits.get(spec.counter, 0) < p.exit_n:
                raise BenchError(f"avmm saw {run.exits} exits, expected {p.exit_n} "
                                 f"{spec.counter}")
            return run.seconds

        def avmm_empty(spec: ExitKind = spec, cmd: Callable[[int], str] = cmd) -> float:
            return avmm_run_sync(cmd(0), rng=spec.rng, expect="done").seconds

        def qemu_loaded(cmd: Callable[[int], str] = cmd, done: str = done,
                        devices: tuple[str, ...] = devices) -> float:
            return qemu_run(cmd(p.exit_n), devices=devices, expect=done).seconds

        def qemu_empty(cmd: Callable[[int], str] = cmd,
                       devices: tuple[str, ...] = devices) -> float:
            return qemu_run(cmd(0), devices=devices, expect="done").seconds

        for _ in range(p.runs):
            a = per_unit(avmm_loaded, avmm_empty, p.exit_n, what, figure)
            q = per_unit(qemu_loaded, qemu_empty, p.exit_n, what, figure)
            figure.add(a * 1e6, q * 1e6)
        figures.append(figure)
    return figures


# -- (b) start-up ------------------------------------------------------------------------


#: What every avmm process imports before any avmm code: the interpreter of avmm's venv
#: with the two packages its layers stand on (trio for the event loop, structlog for the
#: logs; DESIGN.md), structlog with rich hidden from it as avmm imports it
#: (:func:`avmm._lazy.import_structlog_without_rich`). A process that imports them and
#: prints one byte is the floor under ``avmm up``'s start-up and memory, whatever avmm
#: itself does.
FLOOR_IMPORTS = "import sys\nsys.modules['rich'] = None\nimport trio, structlog"
FLOOR_NOTE = ("the venv's python importing trio and structlog (without rich, as avmm "
              "does), then printing one byte; no avmm code: the floor under the row above")


def floor_argv(stay_s: float = 0) -> list[str]:
    """A process that imports :data:`FLOOR_IMPORTS`, prints one byte, then sleeps
    ``stay_s`` (for a reading of its memory) and exits."""
    return [sys.executable, "-c", f"{FLOOR_IMPORTS}\nimport os, time\n"
            f"os.write(1, b'x')\ntime.sleep({stay_s})"]


def floor_memory() -> dict[str, int]:
    """/proc/PID/status (kB fields) of :func:`floor_argv`'s process once it printed."""
    process = subprocess.Popen(floor_argv(60), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if os.read(process.stdout.fileno(), 1) != b"x":
            raise BenchError(f"{FLOOR_IMPORTS!r} failed: {stderr_of(process)!r}")
        return status_of(process.pid)
    finally:
        end_process(process)


def bench_startup(p: Params) -> list[Figure]:
    """Milliseconds to the guest's first serial byte and to its exit, for the hello guest:
    ``avmm up`` as a process against a QEMU process (whole processes), and a VM started
    inside this running trio program against the same QEMU runs (in-process). The floor:
    :func:`floor_argv`'s process to its byte, against the same QEMU runs."""
    note = "examples/hello.toml vs QEMU microvm, same guest and cmdline"
    up_first = Figure("start-up: `avmm up` process → first serial byte", "ms", "lower",
                      WHOLE_PROCESS, note=note, goal=Goal("ratio", "≤", 2))
    up_exit = Figure("start-up: `avmm up` process → guest exit", "ms", "lower", WHOLE_PROCESS,
                     note=note)
    in_note = "VirtualMachine() in a running trio program vs a QEMU process"
    inproc_first = Figure("start-up: VM in a running avmm process → first serial byte", "ms",
                          "lower", IN_PROCESS, note=in_note)
    inproc_exit = Figure("start-up: VM in a running avmm process → guest exit", "ms", "lower",
                         IN_PROCESS, note=in_note)
    floor = Figure("start-up floor: python process importing trio and structlog → first "
                   "byte", "ms", "lower", WHOLE_PROCESS, note=FLOOR_NOTE)
    qemu = qemu_argv(HELLO)
    for _ in range(p.runs):
        up = process_run(avmm_up_argv(HELLO_TOML), expect=HELLO_DONE)
        inproc = avmm_run_sync(HELLO, expect=HELLO_DONE)
        q = process_run(qemu, expect=HELLO_DONE)
        bare = process_run(floor_argv(), expect="x")
        up_first.add(up.first_byte * 1e3, q.first_byte * 1e3)
        up_exit.add(up.seconds * 1e3, q.seconds * 1e3)
        inproc_first.add(inproc.first_byte * 1e3, q.first_byte * 1e3)
        inproc_exit.add(inproc.seconds * 1e3, q.seconds * 1e3)
        floor.add(bare.first_byte * 1e3, q.first_byte * 1e3)
    return [up_first, floor, up_exit, inproc_first, inproc_exit]


# -- (c) block I/O ---------------------------------------------------------------------


@contextlib.contextmanager
def bench_image(p: Params) -> Iterator[Path]:
    """An image of random data in /dev/shm (tmpfs), removed afterwards."""
    image = SHM / f"avmm-bench-{os.getpid()}.img"
    with open(image, "wb") as f:
        for _ in range(p.blk_image_mib):
            f.write(os.urandom(1 << 20))
    try:
        yield image
    finally:
        image.unlink(missing_ok=True)


def _blk_cmd(n: int, rw: str, qd: int) -> str:
    return f"avmm.test=blk-bench avmm.rw={rw} avmm.qd={qd} avmm.n={n} avmm.qsize=128"


def _blk_goal(label: str, rw: str, qd: int) -> Goal | None:
    """Issue 16's goals, for avmm's own virtio-blk at queue depth 32: writes at least
    0.9 of QEMU's rate, reads at least QEMU's "steadily" (in every pair)."""
    if label or qd != 32:
        return None
    return Goal("ratio", "≥", 0.9) if rw == "write" else Goal("every pair", "≥", 1.0)


def _blk_figures(p: Params, counts: dict[int, int], label: str, note: str,
                 avmm_side: Side, qemu_side: Side, options: str = "") -> list[Figure]:
    """IOPS of ``blk-bench`` (random 4 KiB, polling): N requests minus 0 requests (the
    device is still set up), per VMM and run; and from the same runs, the rate the guest
    timed itself (its TSC, at the rate KVM gives a vCPU here: the same for both VMMs),
    which no boot-time noise reaches."""

    tsc_hz = tsc_khz() * 1e3
    figures = []
    for rw in ("read", "write"):
        for qd, n in counts.items():
            goal = _blk_goal(label, rw, qd)
            figure = Figure(f"blk 4 KiB random {rw}, qd {qd}{label}", "IOPS", "higher",
                            PER_OPERATION,
                            note=f"blk-bench n={n} minus n=0, image in {SHM}{note}", goal=goal)
            timed = Figure(f"blk 4 KiB random {rw}, qd {qd}{label}, guest-timed", "IOPS",
                           "higher", PER_OPERATION, goal=goal,
                           note=f"the n={n} runs of the row above, timed by blk-bench itself "
                                "(TSC from its first request to its last completion)")
            done = f"blk-bench rw={rw} qd={qd} n={n} done"
            what = f"blk-bench {rw} qd {qd}{label}"
            outputs: dict[str, str] = {}

            def loaded_run(side: Side, cmdline: str, who: str, what: str = what,
                           done: str = done, outputs: dict[str, str] = outputs) -> float:
                seconds, output = side(cmdline)
                if done not in output:
                    raise BenchError(f"{what}: no {done!r} in the guest's output: {output!r}")
                outputs[who] = output
                return seconds

            for _ in range(p.runs):
                loaded, empty = _blk_cmd(n, rw, qd) + options, _blk_cmd(0, rw, qd) + options
                a = per_unit(lambda c=loaded: loaded_run(avmm_side, c, "avmm"),
                             lambda c=empty, w=what: checked(avmm_side, c, "done", w),
                             n, what, figure)
                q = per_unit(lambda c=loaded: loaded_run(qemu_side, c, "qemu"),
                             lambda c=empty, w=what: checked(qemu_side, c, "done", w),
                             n, what, figure)
                figure.add(1 / a, 1 / q)
                timed.add(guest_timed_iops(outputs["avmm"], tsc_hz, what),
                          guest_timed_iops(outputs["qemu"], tsc_hz, what))
            figures += [figure, timed]
    return figures


def bench_blk(p: Params) -> list[Figure]:
    """avmm's in-process virtio-blk vs QEMU's virtio-blk-device on the same image."""
    with bench_image(p) as image:
        def avmm_side(cmdline: str) -> tuple[float, str]:
            run = avmm_run_sync(cmdline, disks=[image])
            return run.seconds, run.output

        def qemu_side(cmdline: str) -> tuple[float, str]:
            run = qemu_run(cmdline, disks=[image])
            return run.seconds, run.output

        return _blk_figures(p, p.blk_n, "", "", avmm_side, qemu_side)


def storage_daemon(image: Path) -> contextlib.AbstractContextManager[Path]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on a fresh socket (one
    per VM run, so no run sees another's connection state); yields the socket."""
    sock = SHM / f"avmm-bench-qsd-{os.getpid()}-{next(_sockets)}.sock"
    return serving([QSD, "--blockdev", f"driver=file,node-name=file,filename={image}",
                    "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
                    f"addr.path={sock},writable=on"], sock, "qemu-storage-daemon")


#: QEMU 7.2's vhost-user-blk offers VIRTIO_BLK_F_SIZE_MAX with qemu-storage-daemon's
#: size_max of 0, which the test guest refuses unless told (tests/guest/README.md).
LAX_SIZE_MAX = " avmm.lax_size_max=1"


def bench_blk_vhost(p: Params) -> list[Figure]:
    """The same blk-bench with the disk served by qemu-storage-daemon over vhost-user:
    avmm's vhost-user front-end (``[[disk]] vhost_user``) vs QEMU's ``vhost-user-blk``
    (guest RAM in a shared memfd), each with a qemu-storage-daemon of its own."""
    from avmm.config import DiskConfig

    if shutil.which(QSD) is None:
        raise BenchError(f"{QSD} is not installed (make deps-test installs qemu-system-x86)")
    with bench_image(p) as image:
        def avmm_side(cmdline: str) -> tuple[float, str]:
            with storage_daemon(image) as sock:
                run = avmm_run_sync(cmdline, disks=[DiskConfig(vhost_user=sock)])
            return run.seconds, run.output

        def qemu_side(cmdline: str) -> tuple[float, str]:
            with storage_daemon(image) as sock:
                run = qemu_run(cmdline, memfd=True, devices=[
                    "-chardev", f"socket,id=vu0,path={sock}",
                    "-device", "vhost-user-blk,chardev=vu0"])
            return run.seconds, run.output

        # More requests than in-process: the data path bypasses both VMMs (ioeventfd kicks
        # to the daemon), so a run of blk_n would be lost in the boot-time noise.
        return _blk_figures(p, p.blk_vhost_n, ", vhost-user (qsd)",
                            "; both VMMs with qemu-storage-daemon over vhost-user",
                            avmm_side, qemu_side, options=LAX_SIZE_MAX)


# -- (d) VM churn ------------------------------------------------------------------------


async def _avmm_churn(seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        await avmm_run(HELLO, expect=HELLO_DONE)
        count += 1
    return count / elapsed


def _process_churn(argv: list[str], seconds: float) -> float:
    """VMs per second from starting ``argv`` (one VM per process) one after another for
    ``seconds``, each to its end."""
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        process_run(argv, expect=HELLO_DONE)
        count += 1
    return count / elapsed


def bench_churn(p: Params) -> list[Figure]:
    """Hello VMs created, booted and exited one after another for ``churn_s`` seconds:
    ``avmm up`` per VM against ``qemu-system-x86_64`` per VM (whole processes), and VMs
    in one running avmm process, as a daemon makes them, against the same QEMU figure."""
    during = f"one after another for {p.churn_s:g} s"
    processes = Figure("VM churn: `avmm up` process per VM, hello guest", "VMs/s", "higher",
                       WHOLE_PROCESS, note=f"{during}; both VMMs one process per VM")
    in_process = Figure("VM churn: VMs one after another in one avmm process, hello guest",
                        "VMs/s", "higher", IN_PROCESS,
                        note=f"{during}; avmm in one process, QEMU one process per VM",
                        goal=Goal("avmm", "≥", 100))
    up, qemu = avmm_up_argv(HELLO_TOML), qemu_argv(HELLO)
    for _ in range(p.runs):
        q = _process_churn(qemu, p.churn_s)
        processes.add(_process_churn(up, p.churn_s), q)
        in_process.add(trio.run(_avmm_churn, p.churn_s), q)
    return [processes, in_process]


# -- (e) memory --------------------------------------------------------------------------


def _avmm_memory(vms: int) -> dict[str, int]:
    """/proc/self/status (kB fields) of a fresh ``benchmarks.memchild`` process with
    ``vms`` VMs in it, each guest in its ``count`` loop."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.memchild", str(vms)],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])["status"]  # type: ignore[no-any-return]
    raise BenchError(f"memchild {vms} failed: {result.stdout!r} {result.stderr!r}")


SPIN = f"avmm.test=count avmm.n={SPIN_N}"


def _avmm_up_memory(tmp: Path) -> dict[str, int]:
    toml = tmp / f"avmm-bench-spin-{os.getpid()}.toml"
    toml.write_text(f'name = "spin"\n[machine]\nvcpus = 1\nmemory_mib = {GUEST_MEMORY_MIB}\n'
                    f'[boot]\nkernel = "{TEST_GUEST}"\ncmdline = "{SPIN}"\n'
                    '[serial]\nmode = "console"\n')
    try:
        return process_memory(avmm_up_argv(toml), "avmm up")
    finally:
        toml.unlink(missing_ok=True)


def bench_memory(p: Params) -> list[Figure]:
    """RSS without guest RAM (``VmRSS - RssShmem``; guest RAM is a memfd in both VMMs),
    with every guest in its ``count`` loop. Whole processes: an ``avmm up`` process and a
    QEMU process, one VM each. In-process: ``benchmarks.memchild`` processes with 0, 1
    and each of ``p.memory_vms`` VMs; the per-VM figures are marginal (what the first VM
    adds to a process that has avmm loaded, then what each VM beyond the first adds),
    against one QEMU process per VM."""
    mib = 1024.0
    one = Figure("memory: RSS of a 1-VM process, guest RAM excluded", "MiB", "lower",
                 WHOLE_PROCESS, note="`avmm up` vs QEMU; VmRSS - RssShmem",
                 goal=Goal("ratio", "≤", 1))
    guest = Figure("memory: guest RAM touched by a 1-VM process (RssShmem)", "MiB", "lower",
                   WHOLE_PROCESS,
                   note=f"test guest running `count`, {GUEST_MEMORY_MIB} MiB configured")
    floor = Figure("memory floor: RSS of a python process importing trio and structlog",
                   "MiB", "lower", WHOLE_PROCESS, note=FLOOR_NOTE.replace("the row above",
                                                                         "the 1-VM row"))
    qemu_note = "QEMU: one process per VM, so its 1-VM RSS"
    first = Figure("memory: extra RSS for the first VM (0 → 1 VM in one avmm process)",
                   "MiB", "lower", IN_PROCESS, note=f"avmm imported, no VM → 1 VM; {qemu_note}")
    extra = {k: Figure(f"memory: extra RSS per VM (1 → {k} VMs in one avmm process)",
                       "MiB", "lower", IN_PROCESS, note=qemu_note)
             for k in p.memory_vms}
    qemu = [*qemu_argv(SPIN, memfd=True)]
    for _ in range(p.runs):
        up = _avmm_up_memory(Path("/tmp"))
        own = {}
        for k in (0, 1, *p.memory_vms):
            status = _avmm_memory(k)
            own[k] = (status["VmRSS"] - status["RssShmem"]) / mib
        q = process_memory(qemu, "QEMU")
        q_own = (q["VmRSS"] - q["RssShmem"]) / mib
        one.add((up["VmRSS"] - up["RssShmem"]) / mib, q_own)
        bare = floor_memory()
        floor.add((bare["VmRSS"] - bare["RssShmem"]) / mib, q_own)
        guest.add(up["RssShmem"] / mib, q["RssShmem"] / mib)
        first.add(own[1] - own[0], q_own)
        for k, figure in extra.items():
            figure.add((own[k] - own[1]) / (k - 1), q_own)
    return [one, floor, guest, first, *extra.values()]


# -- the driver ----------------------------------------------------------------------------

GROUPS: dict[str, Callable[[Params], list[Figure]]] = {
    "exits": bench_exits,
    "startup": bench_startup,
    "blk": bench_blk,
    "blk-vhost": bench_blk_vhost,
    "net": lambda p: bench_net(p.runs, p.net_n),
    "net-vhost": lambda p: bench_net_vhost(p.runs, p.net_n),
    "churn": bench_churn,
    "isolation": lambda p: bench_isolation(p.runs, p.churn_s),
    "memory": bench_memory,
    "snapshot": lambda p: bench_snapshot(p.runs, p.snapshot_mib),
    "migration": lambda p: bench_migration(p.runs, p.migration_mib),
    "fairness": lambda p: [*bench_fairness_cpu(p.runs, p.fairness_window_s),
                           *bench_fairness_io(p.runs, p.fairness_s),
                           *bench_fairness_net(p.runs, p.fairness_s),
                           *bench_noisy_neighbour(p.runs, p.noisy_n)],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few runs, small N (smoke test)")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), metavar="GROUP",
                        help=f"run only these groups ({', '.join(GROUPS)}); repeatable")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, --quick 2)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench",
                        help="directory for the JSON (default build/bench)")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.runs:
        params = Params(**{**params.__dict__, "runs": args.runs})
    quiet_logging()
    # Taken before the run: the commit measured is the one checked out when it started.
    origin = provenance()
    started = time.time()
    t0 = time.perf_counter()
    results: dict[str, dict[str, object]] = {}
    for group in args.only or list(GROUPS):
        log(f"benchmarks: {group} ...")
        g0 = time.perf_counter()
        for figure in GROUPS[group](params):
            results[figure.name] = {"group": group, **figure.to_json()}
        log(f"benchmarks: {group} took {time.perf_counter() - g0:.1f} s")
    duration = time.perf_counter() - t0
    report = {
        "provenance": origin,
        "duration_s": duration,
        "quick": args.quick,
        "params": params.__dict__,
        "parts": PARTS,
        "figures": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    (args.out / "latest.json").write_text(text)
    (args.out / time.strftime("bench-%Y%m%d-%H%M%S.json", time.gmtime(started))).write_text(text)
    print(markdown(report), end="")
    print(f"\n{len(results)} figures in {duration:.0f} s; JSON in {args.out / 'latest.json'}; "
          "`python -m benchmarks.report --write-readme` puts the tables in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
