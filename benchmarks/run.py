"""avmm side by side with QEMU microvm on the same machine, KVM and test guest.

    .venv/bin/python -m benchmarks.run [--quick] [--only GROUP ...] [--runs R] [--out DIR]

Groups: exits, startup, blk, churn, memory. Every figure is measured here and now: for
each of R runs (5 by default, 2 with --quick) avmm and QEMU are measured back to back, and
the ratio avmm/QEMU is taken per pair. The table goes to stdout, the JSON to
``build/bench/`` (``latest.json`` and a timestamped copy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from benchmarks.common import (
    AVMM,
    REPO,
    BenchError,
    Figure,
    avmm_run,
    avmm_run_sync,
    process_run,
    qemu_argv,
    qemu_run,
    quiet_logging,
)
from benchmarks.memchild import MAILBOX_ADDRESS, MAILBOX_MAGIC, MARKER, SPIN_N

HELLO_TOML = REPO / "examples" / "hello.toml"
HELLO = "console=ttyS0 avmm.test=hello"
HELLO_DONE = "avmm-testguest: cmdline:"


@dataclass(frozen=True)
class Params:
    runs: int
    exit_n: int
    blk_n: dict[int, int]   # queue depth → requests
    churn_s: float
    memory_vms: int
    blk_image_mib: int = 64


FULL = Params(runs=5, exit_n=20000, blk_n={1: 2000, 32: 10000}, churn_s=2.0, memory_vms=10)
QUICK = Params(runs=2, exit_n=2000, blk_n={1: 1000, 32: 2000}, churn_s=0.3, memory_vms=2)


NOISE_ATTEMPTS = 5


def per_unit(loaded: Callable[[], float], empty: Callable[[], float], n: int, what: str,
             figure: Figure) -> float:
    """Seconds per item from a run of n items minus a run of none. A pair whose
    difference is lost in the boot-time noise is measured again (counted in the figure's
    ``retries``), never turned into a figure."""
    for _ in range(NOISE_ATTEMPTS):
        total_s, baseline_s = loaded(), empty()
        if total_s > baseline_s:
            return (total_s - baseline_s) / n
        figure.retries += 1
        log(f"benchmarks: {what}: n={n} took {total_s:.4f} s, n=0 {baseline_s:.4f} s; again")
    raise BenchError(f"{what}: n={n} never measurably slower than n=0; raise n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def bench_blk(p: Params) -> list[Figure]:
    """IOPS of ``blk-bench`` (random 4 KiB, polling) on an image in /dev/shm: N requests
    minus 0 requests (the device is still set up), per VMM and run."""
    figures = []
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    image = shm / f"avmm-bench-{os.getpid()}.img"
    with open(image, "wb") as f:
        for _ in range(p.blk_image_mib):
            f.write(os.urandom(1 << 20))
    try:
        for rw in ("read", "write"):
            for qd, n in p.blk_n.items():
                figure = Figure(f"blk 4 KiB random {rw}, qd {qd}", "IOPS", "higher",
                                note=f"blk-bench n={n} minus n=0, image in {shm}")
                for _ in range(p.runs):
                    def cmd(n: int, rw: str = rw, qd: int = qd) -> str:
                        return (f"avmm.test=blk-bench avmm.rw={rw} avmm.qd={qd} avmm.n={n} "
                                f"avmm.qsize=128")

                    done = f"blk-bench rw={rw} qd={qd} n={n} done"
                    what = f"blk-bench {rw} qd {qd}"
                    a = per_unit(
                        lambda cmd=cmd, n=n, done=done: avmm_run_sync(
                            cmd(n), disks=[image], expect=done).seconds,
                        lambda cmd=cmd: avmm_run_sync(cmd(0), disks=[image],
                                                      expect="done").seconds,
                        n, what, figure)
                    q = per_unit(
                        lambda cmd=cmd, n=n, done=done: qemu_run(cmd(n), disks=[image],
                                                                 expect=done).seconds,
                        lambda cmd=cmd: qemu_run(cmd(0), disks=[image], expect="done").seconds,
                        n, what, figure)
                    figure.add(1 / a, 1 / q)
                figures.append(figure)
    finally:
        image.unlink(missing_ok=True)
    return figures


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
    mib = 1024.0
    one = Figure("memory: RSS of a 1-VM process, guest RAM excluded", "MiB", "lower",
                 note="VmRSS - RssShmem; guest RAM is a memfd in both VMMs")
    extra = Figure(f"memory: extra RSS per VM (1 → {p.memory_vms} VMs in one avmm process)",
                   "MiB", "lower", note="QEMU: one process per VM, so its 1-VM RSS")
    guest = Figure("memory: guest RAM touched per VM (RssShmem)", "MiB", "lower",
                   note="test guest running `count`, 64 MiB of RAM configured")
    for _ in range(p.runs):
        a1 = _avmm_memory(1)
        an = _avmm_memory(p.memory_vms)
        q = _qemu_memory(Path("/tmp"))
        a1_own = (a1["VmRSS"] - a1["RssShmem"]) / mib
        an_own = (an["VmRSS"] - an["RssShmem"]) / mib
        q_own = (q["VmRSS"] - q["RssShmem"]) / mib
        one.add(a1_own, q_own)
        extra.add((an_own - a1_own) / (p.memory_vms - 1), q_own)
        guest.add(an["RssShmem"] / mib / p.memory_vms, q["RssShmem"] / mib)
    return [one, extra, guest]


# -- the driver ----------------------------------------------------------------------------

GROUPS: dict[str, Callable[[Params], list[Figure]]] = {
    "exits": bench_exits,
    "startup": bench_startup,
    "blk": bench_blk,
    "churn": bench_churn,
    "memory": bench_memory,
}


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.1 else f"{value:.2g}"


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
                     f"{ratio['median']:.2f}" if isinstance(ratio, dict) else "-"))
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
