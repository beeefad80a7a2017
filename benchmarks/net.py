"""Network figures: frames/s through virtio-net between the test guest (``net-bench``)
and a tap in a private network namespace, avmm's in-process device vs QEMU's
``virtio-net-device`` (userspace ``-netdev tap``: this machine has no vhost-net).

Both VMMs attach to the same persistent tap (``tests/virtio_guest_support.py``,
``TapNamespace``), one after the other. Transmit: the guest sends N frames and the host
kernel is the sink (it drops the unknown ethertype); the tap's ``rx_packets`` counter
confirms that the N frames arrived (the TSO figure: N 64 KiB TCP segments that ask the
host to checksum and segment them, as a Linux guest's TCP sends with offloads; in MiB/s).
Receive: ``benchmarks/netpeer.py`` keeps the tap's
queue full from a process of its own, and the guest counts N frames. Either way the
figure is N over the wall time of a run with N frames minus a run with none, like the
other figures (``per_unit``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import (
    PER_OPERATION,
    REPO,
    SHM,
    BenchError,
    Figure,
    Goal,
    Side,
    avmm_run_sync,
    checked,
    per_unit,
    qemu_run,
    serving,
)

if TYPE_CHECKING:
    from tests.virtio_guest_support import TapNamespace

GUEST_MAC = "52:54:00:12:34:56"
#: Frame sizes (Ethernet header included, no FCS).
SIZES = (64, 1500)
SENDER_START_S = 30
_sockets = itertools.count()
#: The TSO figure's frames: a 64 KiB IPv4 packet behind an Ethernet header.
TSO_SIZE = 14 + 65535
MIB = 1 << 20


def tap_rx_packets(netns: str, tap: str) -> int:
    """Frames the host got from the tap's VMM side so far (the interface's rx_packets)."""
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", tap],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


@contextlib.contextmanager
def sender(prefix: list[str], tap: str, size: int) -> Iterator[None]:
    """``benchmarks/netpeer.py`` sending ``size``-byte frames into ``tap`` until the end
    of the block."""
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "benchmarks.netpeer", tap, str(size)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise BenchError(f"netpeer did not start: {process.communicate()[1]!r}")
        yield
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            out, err = process.communicate(timeout=SENDER_START_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    if process.returncode != 0:
        raise BenchError(f"netpeer failed ({process.returncode}): {out!r} {err!r}")


def bench_net(runs: int, n: int) -> list[Figure]:
    """avmm's in-process virtio-net against QEMU's ``virtio-net-device`` on a tap."""
    from avmm.config import NetConfig
    from tests.virtio_guest_support import TapNamespace, qemu_tap_netdev

    _check_prerequisites("net")
    with TapNamespace() as namespace:
        prefix = namespace.command_prefix()
        nets = [NetConfig(tap=namespace.tap, mac=bytes.fromhex(GUEST_MAC.replace(":", "")),
                          netns=namespace.netns)]
        devices = ["-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
                   "-netdev", qemu_tap_netdev(namespace.tap)]

        def avmm_side(cmdline: str) -> tuple[float, str]:
            run = avmm_run_sync(cmdline, nets=nets)
            return run.seconds, run.output

        def qemu_side(cmdline: str) -> tuple[float, str]:
            run = qemu_run(cmdline, devices=devices, prefix=prefix)
            return run.seconds, run.output

        return _figures(namespace, runs, n, avmm_side, qemu_side, label="", note="",
                        tso=True)


def bench_net_vhost(runs: int, n: int) -> list[Figure]:
    """``avmm backend net`` serving QEMU over vhost-user against QEMU's own
    ``virtio-net-device``: both front-ends are QEMU, on the same tap."""
    from tests.virtio_guest_support import TapNamespace, qemu_tap_netdev

    _check_prerequisites("net-vhost")
    with TapNamespace() as namespace:
        prefix = namespace.command_prefix()
        builtin = ["-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
                   "-netdev", qemu_tap_netdev(namespace.tap)]

        def backend_side(cmdline: str) -> tuple[float, str]:
            with net_backend(prefix, namespace.tap) as sock:
                run = qemu_run(cmdline, memfd=True, devices=[
                    "-chardev", f"socket,id=vu0,path={sock}",
                    "-netdev", "vhost-user,id=n0,chardev=vu0",
                    "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"])
            return run.seconds, run.output

        def qemu_side(cmdline: str) -> tuple[float, str]:
            run = qemu_run(cmdline, devices=builtin, prefix=prefix)
            return run.seconds, run.output

        return _figures(namespace, runs, n, backend_side, qemu_side,
                        label=", vhost-user (avmm backend net)",
                        note="; avmm: QEMU + `avmm backend net` over vhost-user, QEMU: its "
                             "built-in virtio-net", tso=False)


def _check_prerequisites(group: str) -> None:
    from tests.prerequisites import net_problem

    problem = net_problem()
    if problem is not None:
        raise BenchError(f"{group}: {problem}; leave the group out with --only for the others")


def net_backend(prefix: list[str], tap: str) -> contextlib.AbstractContextManager[Path]:
    """``avmm backend net`` on ``tap`` (in the namespace ``prefix`` enters) listening on a
    fresh socket, one per VM run; yields the socket."""
    sock = SHM / f"avmm-bench-net-{os.getpid()}-{next(_sockets)}.sock"
    return serving([*prefix, sys.executable, "-m", "avmm.cli", "backend", "net", "--socket",
                    str(sock), "--tap", tap, "--mac", GUEST_MAC], sock, "avmm backend net")


def _figures(namespace: TapNamespace, runs: int, n: int, avmm_side: Side, qemu_side: Side, *,
             label: str, note: str, tso: bool) -> list[Figure]:
    """The frames/s figures (TX and RX, each frame size) and, with ``tso``, the TSO one,
    of ``avmm_side`` against ``qemu_side`` on ``namespace``'s tap."""
    prefix = namespace.command_prefix()
    def transmitted(side: Side, cmdline: str, expect: str, what: str) -> float:
        before = tap_rx_packets(namespace.netns, namespace.tap)
        seconds = checked(side, cmdline, expect, what)
        arrived = tap_rx_packets(namespace.netns, namespace.tap) - before
        if arrived < n:
            raise BenchError(f"{what}: the guest sent {n} frames, the tap got {arrived}")
        return seconds

    def measure(direction: str, size: int) -> Figure:
        way = "TX guest → host" if direction == "tx" else "RX host → guest"
        figure = Figure(
            f"net {size} B frames, {way}{label}", "frames/s", "higher", PER_OPERATION,
            note=f"net-bench n={n} minus n=0; tap in a netns, "
                 + ("host kernel as sink" if direction == "tx"
                    else "benchmarks/netpeer.py as source") + note,
            # Issue 16's goal is for avmm's own virtio-net (the back-end's has none).
            goal=None if label else Goal("ratio", "≥", 0.8))

        def cmd(count: int) -> str:
            return (f"avmm.test=net-bench avmm.dir={direction} avmm.size={size} "
                    f"avmm.n={count}")

        done = f"net-bench dir={direction} size={size} n={n} done"
        what = f"net-bench {direction} {size} B"
        loaded = transmitted if direction == "tx" else checked
        source = (sender(prefix, namespace.tap, size) if direction == "rx"
                  else contextlib.nullcontext())
        with source:
            for _ in range(runs):
                a = per_unit(lambda: loaded(avmm_side, cmd(n), done, what),
                             lambda: checked(avmm_side, cmd(0), "done", what),
                             n, what, figure)
                q = per_unit(lambda: loaded(qemu_side, cmd(n), done, what),
                             lambda: checked(qemu_side, cmd(0), "done", what),
                             n, what, figure)
                figure.add(1 / a, 1 / q)
        return figure

    def measure_tso() -> Figure:
        figure = Figure(
            f"net TSO {TSO_SIZE // 1024} KiB TCP segments, TX guest → host", "MiB/s",
            "higher", PER_OPERATION,
            note=f"net-bench avmm.tso=1 n={n} minus n=0 (checksum and segmentation "
                 "offloads negotiated: each frame a 64 KiB TCP/IPv4 segment the "
                 "host kernel takes whole); host kernel as sink")

        def cmd(count: int) -> str:
            return (f"avmm.test=net-bench avmm.dir=tx avmm.tso=1 avmm.size={TSO_SIZE} "
                    f"avmm.n={count}")

        done = f"net-bench dir=tx size={TSO_SIZE} n={n} tso=1 done"
        what = "net-bench tx TSO"
        for _ in range(runs):
            a = per_unit(lambda: transmitted(avmm_side, cmd(n), done, what),
                         lambda: checked(avmm_side, cmd(0), "done", what), n, what, figure)
            q = per_unit(lambda: transmitted(qemu_side, cmd(n), done, what),
                         lambda: checked(qemu_side, cmd(0), "done", what), n, what, figure)
            figure.add(TSO_SIZE / a / MIB, TSO_SIZE / q / MIB)
        return figure

    figures = [measure(direction, size) for direction in ("tx", "rx") for size in SIZES]
    if tso:
        figures.append(measure_tso())
    return figures
