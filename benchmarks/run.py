"""avmm side by side with QEMU microvm on the same machine, KVM and test guest.

    .venv/bin/python -m benchmarks.run [--quick] [--only GROUP ...] [--runs R] [--out DIR]

Groups: exits, startup, blk, blk-vhost, net, churn, memory. Every figure is measured here
and now: for each of R runs (5 by default, 2 with --quick) avmm and QEMU are measured back
to back, and the ratio avmm/QEMU is taken per pair. The table goes to stdout, the JSON to
``build/bench/`` (``latest.json`` and a timestamped copy).

blk-vhost needs qemu-storage-daemon; net needs root, /dev/net/tun and iproute2 (a tap in
a network namespace, see benchmarks/net.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from benchmarks.common import (
    AVMM,
    REPO,
    BenchError,
    Figure,
    Side,
    avmm_run,
    avmm_run_sync,
    checked,
    log,
    per_unit,
    process_run,
    qemu_argv,
    qemu_run,
    quiet_logging,
)
from benchmarks.memchild import MAILBOX_ADDRESS, MAILBOX_MAGIC, MARKER, SPIN_N
from benchmarks.net import bench_net

HELLO_TOML = REPO / "examples" / "hello.toml"
HELLO = "console=ttyS0 avmm.test=hello"
HELLO_DONE = "avmm-testguest: cmdline:"
QSD = "qemu-storage-daemon"
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
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


FULL = Params(runs=5, exit_n=20000, blk_n={1: 2000, 32: 10000},
              blk_vhost_n={1: 10000, 32: 40000}, net_n=50000, churn_s=2.0, memory_vms=(10, 50))
QUICK = Params(runs=2, exit_n=2000, blk_n={1: 1000, 32: 2000},
               blk_vhost_n={1: 1000, 32: 2000}, net_n=2000, churn_s=0.3, memory_vms=(2, 3))


# -- (a) VM exit round trip -------------------------------------------------------------


def bench_exits(p: Params) -> list[Figure]:
    """µs per exit: two runs of ``exit-loop`` per VMM and run, N exits and 0 exits; the
    difference over N cancels boot and teardown."""
    figures = []
    for kind, counter in (("pio", "IoOut"), ("mmio", "MmioWrite")):
        figure = Figure(f"exit round trip, {kind}", "µs/exit", "lower",
                        note=f"exit-loop n={p.exit_n} minus n=0, wall time")
        for _ in range(p.runs):
            def cmd(n: int, kind: str = kind) -> str:
                return f"avmm.test=exit-loop avmm.kind={kind} avmm.n={n}"

            done = f"exit-loop kind={kind} n={p.exit_n} done"

            def avmm_loaded(cmd: Callable[[int], str] = cmd, done: str = done,
                            counter: str = counter) -> float:
                run = avmm_run_sync(cmd(p.exit_n), expect=done)
                if run.exits.get(counter, 0) < p.exit_n:
                    raise BenchError(f"avmm saw {run.exits} exits, expected {p.exit_n} "
                                     f"{counter}")
                return run.seconds

            what = f"exit-loop {kind}"
            a = per_unit(avmm_loaded,
                         lambda cmd=cmd: avmm_run_sync(cmd(0), expect="done").seconds,
                         p.exit_n, what, figure)
            q = per_unit(lambda cmd=cmd, done=done: qemu_run(cmd(p.exit_n), expect=done).seconds,
                         lambda cmd=cmd: qemu_run(cmd(0), expect="done").seconds,
                         p.exit_n, what, figure)
            figure.add(a * 1e6, q * 1e6)
        figures.append(figure)
    return figures


# -- (b) start-up ------------------------------------------------------------------------


def bench_startup(p: Params) -> list[Figure]:
    up_first = Figure("start-up: process → first serial byte (avmm up)", "ms", "lower",
                      note="examples/hello.toml vs QEMU microvm, same guest and cmdline")
    up_exit = Figure("start-up: process → guest exit (avmm up)", "ms", "lower")
    inproc_first = Figure("start-up: in-process VM → first serial byte", "ms", "lower",
                          note="VirtualMachine in a running trio program vs a QEMU process")
    inproc_exit = Figure("start-up: in-process VM → guest exit", "ms", "lower")
    qemu = qemu_argv(HELLO)
    for _ in range(p.runs):
        up = process_run([str(AVMM), "up", str(HELLO_TOML)], expect=HELLO_DONE)
        inproc = avmm_run_sync(HELLO, expect=HELLO_DONE)
        q = process_run(qemu, expect=HELLO_DONE)
        up_first.add(up.first_byte * 1e3, q.first_byte * 1e3)
        up_exit.add(up.seconds * 1e3, q.seconds * 1e3)
        inproc_first.add(inproc.first_byte * 1e3, q.first_byte * 1e3)
        inproc_exit.add(inproc.seconds * 1e3, q.seconds * 1e3)
    return [up_first, up_exit, inproc_first, inproc_exit]


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


def _blk_figures(p: Params, counts: dict[int, int], label: str, note: str,
                 avmm_side: Side, qemu_side: Side, options: str = "") -> list[Figure]:
    """IOPS of ``blk-bench`` (random 4 KiB, polling): N requests minus 0 requests (the
    device is still set up), per VMM and run."""
    figures = []
    for rw in ("read", "write"):
        for qd, n in counts.items():
            figure = Figure(f"blk 4 KiB random {rw}, qd {qd}{label}", "IOPS", "higher",
                            note=f"blk-bench n={n} minus n=0, image in {SHM}{note}")
            done = f"blk-bench rw={rw} qd={qd} n={n} done"
            what = f"blk-bench {rw} qd {qd}{label}"

            for _ in range(p.runs):
                loaded, empty = _blk_cmd(n, rw, qd) + options, _blk_cmd(0, rw, qd) + options
                a = per_unit(lambda c=loaded, e=done, w=what: checked(avmm_side, c, e, w),
                             lambda c=empty, w=what: checked(avmm_side, c, "done", w),
                             n, what, figure)
                q = per_unit(lambda c=loaded, e=done, w=what: checked(qemu_side, c, e, w),
                             lambda c=empty, w=what: checked(qemu_side, c, "done", w),
                             n, what, figure)
                figure.add(1 / a, 1 / q)
            figures.append(figure)
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


@contextlib.contextmanager
def storage_daemon(image: Path) -> Iterator[Path]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on a fresh socket (one
    per VM run, so no run sees another's connection state); yields the socket."""
    sock = SHM / f"avmm-bench-qsd-{os.getpid()}-{next(_sockets)}.sock"
    argv = [QSD, "--blockdev", f"driver=file,node-name=file,filename={image}",
            "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
            f"addr.path={sock},writable=on"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"qemu-storage-daemon never listened on {sock}: "
                                 f"{_stderr_of(process)!r}")
            time.sleep(0.005)
        yield sock
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        sock.unlink(missing_ok=True)


def _stderr_of(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.kill()
    return process.communicate()[1].decode(errors="replace")


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


def _qemu_churn(seconds: float) -> float:
    argv = qemu_argv(HELLO)
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        process_run(argv, expect=HELLO_DONE)
        count += 1
    return count / elapsed


def bench_churn(p: Params) -> list[Figure]:
    figure = Figure("VM churn: hello VMs created, booted, exited", "VMs/s", "higher",
                    note=f"one after another for {p.churn_s:g} s; avmm in one process, "
                         "QEMU one process per VM")
    for _ in range(p.runs):
        figure.add(trio.run(_avmm_churn, p.churn_s), _qemu_churn(p.churn_s))
    return [figure]


# -- (e) memory --------------------------------------------------------------------------


def _avmm_memory(vms: int) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-m", "benchmarks.memchild", str(vms)],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])["status"]  # type: ignore[no-any-return]
    raise BenchError(f"memchild {vms} failed: {result.stdout!r} {result.stderr!r}")


def _status_of(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0])
    return fields


def _qemu_memory(tmp: Path) -> dict[str, int]:
    """RSS of one QEMU process whose guest (guest RAM in a memfd, so it is RssShmem like
    avmm's) is in its ``count`` loop, which QMP confirms through the mailbox."""
    import socket

    qmp_path = tmp / f"avmm-bench-qmp-{os.getpid()}.sock"
    argv = [*qemu_argv(f"avmm.test=count avmm.n={SPIN_N}", memfd=True),
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(qmp_path))
                break
            sock.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError("QEMU's QMP socket never came up")
            time.sleep(0.02)
        with sock, sock.makefile("rw") as stream:
            def qmp(command: str, **arguments: object) -> object:
                stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
                stream.flush()
                while True:
                    reply = json.loads(stream.readline())
                    if "return" in reply:
                        return reply["return"]
                    if "error" in reply:
                        raise BenchError(f"QMP {command}: {reply}")

            json.loads(stream.readline())
            qmp("qmp_capabilities")
            while True:
                dump = str(qmp("human-monitor-command",
                               **{"command-line": f"xp /2gx {MAILBOX_ADDRESS:#x}"}))
                words = [int(w, 16) for w in dump.split() if w.startswith("0x")]
                if len(words) == 2 and words[0] == MAILBOX_MAGIC and words[1] > 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"QEMU guest never reached its loop: {dump!r}")
                time.sleep(0.02)
            return _status_of(process.pid)
    finally:
        process.kill()
        process.communicate()
        qmp_path.unlink(missing_ok=True)


def bench_memory(p: Params) -> list[Figure]:
    """RSS without guest RAM (``VmRSS - RssShmem``; guest RAM is a memfd in both VMMs) of
    one process with 0, 1 and each of ``p.memory_vms`` test-guest VMs in it, against
    one QEMU process per VM. The per-VM figures are marginal: what the first VM adds to
    a process that has avmm loaded, then what each VM beyond the first adds."""
    mib = 1024.0
    one = Figure("memory: RSS of a 1-VM process, guest RAM excluded", "MiB", "lower",
                 note="VmRSS - RssShmem; guest RAM is a memfd in both VMMs")
    first = Figure("memory: extra RSS for the first VM (0 → 1 VM in one avmm process)",
                   "MiB", "lower",
                   note="avmm imported, no VM → 1 VM; QEMU: one process per VM, its 1-VM RSS")
    extra = {k: Figure(f"memory: extra RSS per VM (1 → {k} VMs in one avmm process)",
                       "MiB", "lower", note="QEMU: one process per VM, so its 1-VM RSS")
             for k in p.memory_vms}
    most = max(p.memory_vms)
    guest = Figure("memory: guest RAM touched per VM (RssShmem)", "MiB", "lower",
                   note=f"test guest running `count`, 64 MiB of RAM configured; avmm: "
                        f"{most} VMs in one process")
    for _ in range(p.runs):
        own = {}
        for k in (0, 1, *p.memory_vms):
            status = _avmm_memory(k)
            own[k] = (status["VmRSS"] - status["RssShmem"]) / mib
            if k == most:
                shmem = status["RssShmem"] / mib
        q = _qemu_memory(Path("/tmp"))
        q_own = (q["VmRSS"] - q["RssShmem"]) / mib
        one.add(own[1], q_own)
        first.add(own[1] - own[0], q_own)
        for k, figure in extra.items():
            figure.add((own[k] - own[1]) / (k - 1), q_own)
        guest.add(shmem / most, q["RssShmem"] / mib)
    return [one, first, *extra.values(), guest]


# -- the driver ----------------------------------------------------------------------------

GROUPS: dict[str, Callable[[Params], list[Figure]]] = {
    "exits": bench_exits,
    "startup": bench_startup,
    "blk": bench_blk,
    "blk-vhost": bench_blk_vhost,
    "net": lambda p: bench_net(p.runs, p.net_n),
    "churn": bench_churn,
    "memory": bench_memory,
}


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.1 else f"{value:.2g}"


def _fmt_ratio(value: float) -> str:
    # Two decimals, but never a bare 0.00 for a small ratio (memory per VM vs a process).
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"


def table(results: dict[str, dict[str, object]]) -> str:
    rows = [("figure", "unit", "avmm median [min-max]", "QEMU median [min-max]",
             "avmm/QEMU")]
    for name, data in results.items():
        def cell(key: str, data: dict[str, object] = data) -> str:
            s = data.get(key)
            if not isinstance(s, dict):
                return "-"
            return f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]"

        ratio = data.get("ratio")
        rows.append((name, str(data["unit"]), cell("avmm"), cell("qemu"),
                     _fmt_ratio(ratio["median"]) if isinstance(ratio, dict) else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": duration,
        "quick": args.quick,
        "params": params.__dict__,
        "machine": {
            "host": platform.node(),
            "kernel": platform.release(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "qemu": _qemu_version(),
        },
        "figures": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    (args.out / "latest.json").write_text(text)
    (args.out / time.strftime("bench-%Y%m%d-%H%M%S.json", time.gmtime(started))).write_text(text)
    print(table(results))
    print(f"\n{len(results)} figures in {duration:.0f} s; JSON in {args.out / 'latest.json'}")
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _qemu_version() -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=False).stdout
        return out.splitlines()[0] if out else ""
    return ""


if __name__ == "__main__":
    sys.exit(main())
