"""The ``fairness`` group, I/O part: how closely avmm's disk rate limiters hold their goal,
against QEMU's block throttling (``-drive throttling.*``) set to the same goal.

The test guest's ``blk-bench`` (random 4 KiB reads, ``avmm.qd`` outstanding) runs on a
disk limited to:

* 500 requests per second (ops bucket of 50, refilled in 100 ms), at qd 1 and qd 32;
  QEMU: ``throttling.iops-total=500``;
* 8 MiB per second (bandwidth bucket of 1 MiB, refilled in 125 ms), at qd 32; QEMU:
  ``throttling.bps-total=8388608``.

A rate is measured past the buckets' initial content: a run of ``n0 + n`` requests minus
a run of ``n0`` (``n0`` larger than the bucket), ``n`` divided by the difference; so it is
the steady rate the limiter lets through, with the boot and the first full bucket taken
out. Goal: the limit ± 10 % (Firecracker's test allows as much).

The burst: 500 requests per second with a ``one_time_burst`` of 950 on top of the bucket
of 50: the first 1000 requests should go through at the device's full speed, not at the
limit's pace (2 s). The figure is the time the first 1000 requests take (a run of 1000
minus a run of 0), at qd 32. QEMU's closest knob is a burst rate
(``throttling.iops-total-max=1000`` for ``iops-total-max-length=1`` second), which is not
the same thing: shown for scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    PER_OPERATION,
    SHM,
    Figure,
    avmm_run_sync,
    checked,
    log,
    per_unit,
    process_run,
    qemu_argv,
)

__all__ = ["bench_fairness_io"]

IMAGE_MIB = 64
REQUEST_BYTES = 4096


@dataclass(frozen=True)
class Limit:
    """One limit as avmm and QEMU spell it, and the goal in requests per second."""

    name: str
    avmm: dict[str, dict[str, int]]
    qemu: str
    per_second: float  # requests per second the limit allows (4 KiB requests)
    qd: int
    warm: int  # n0: past the bucket
    unit: str
    scale: float  # requests per second → the figure's unit


OPS_500 = {"ops": {"size": 50, "refill_ms": 100}}
LIMITS = (
    Limit("blk ops limit 500/s, qd 1", OPS_500, "throttling.iops-total=500", 500, 1, 200,
          "IOPS", 1.0),
    Limit("blk ops limit 500/s, qd 32", OPS_500, "throttling.iops-total=500", 500, 32, 200,
          "IOPS", 1.0),
    Limit("blk bandwidth limit 8 MiB/s, qd 32", {"bandwidth": {"size": 1 << 20,
                                                              "refill_ms": 125}},
          "throttling.bps-total=8388608", 2048, 32, 512, "MiB/s", REQUEST_BYTES / (1 << 20)),
)


def _cmd(n: int, qd: int) -> str:
    return f"avmm.test=blk-bench avmm.rw=read avmm.qd={qd} avmm.n={n} avmm.qsize=128"


def _avmm_side(image: Path, limit: dict[str, dict[str, int]]) -> Callable[[str], tuple[float, str]]:
    from avmm.config import DiskConfig, parse_rate_limit

    disk = DiskConfig(image, rate_limit=parse_rate_limit(limit, "rate_limit"))

    def run(cmdline: str) -> tuple[float, str]:
        result = avmm_run_sync(cmdline, disks=[disk])
        return result.seconds, result.output

    return run


def _qemu_side(image: Path, throttle: str) -> Callable[[str], tuple[float, str]]:
    def run(cmdline: str) -> tuple[float, str]:
        argv = qemu_argv(cmdline)
        argv += ["-device", "virtio-blk-device,drive=d0",
                 "-drive", f"id=d0,file={image},format=raw,if=none,{throttle}"]
        result = process_run(argv)
        return result.seconds, result.output

    return run


def _rate(side: Callable[[str], tuple[float, str]], limit: Limit, n: int, figure: Figure
          ) -> float:
    what = f"{figure.name} n={n}"
    loaded, base = _cmd(limit.warm + n, limit.qd), _cmd(limit.warm, limit.qd)
    done = f"blk-bench rw=read qd={limit.qd} n={limit.warm + n} done"
    seconds = per_unit(lambda: checked(side, loaded, done, what),
                       lambda: checked(side, base, "done", what), n, what, figure)
    return limit.scale / seconds


def bench_fairness_io(runs: int, seconds: float) -> list[Figure]:
    """The figures above; each steady-rate run lasts about ``seconds`` past its warm-up."""
    image = SHM / f"avmm-bench-fairness-{os.getpid()}.img"
    with open(image, "wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(os.urandom(1 << 20))
    figures = []
    try:
        for limit in LIMITS:
            goal = limit.per_second * limit.scale
            figure = Figure(f"rate limit: {limit.name} (goal {goal:g} {limit.unit})",
                            limit.unit, "goal", PER_OPERATION,
                            note=f"steady rate past the bucket; goal {goal:g} ± 10 %; "
                                 f"QEMU {limit.qemu}")
            n = max(int(limit.per_second * seconds), 10)
            avmm = _avmm_side(image, limit.avmm)
            qemu = _qemu_side(image, limit.qemu)
            for _ in range(runs):
                figure.add(_rate(avmm, limit, n, figure), _rate(qemu, limit, n, figure))
            log(f"benchmarks: {figure.name}: avmm {figure.avmm} QEMU {figure.qemu} "
                f"(goal {goal:g} ± 10 %)")
            figures.append(figure)
        figures.append(_burst(image, runs))
    finally:
        image.unlink(missing_ok=True)
    return figures


def _burst(image: Path, runs: int) -> Figure:
    count, qd = 1000, 32
    figure = Figure(f"rate limit: blk ops 500/s with a one-time burst: first {count} "
                    "requests (at the limit's pace: 2000 ms)", "ms", "lower", PER_OPERATION,
                    note="burst 950 on top of a bucket of 50; QEMU: iops-total-max=1000 "
                         "for 1 s (a burst rate, not the same knob)")
    avmm = _avmm_side(image, {"ops": {"size": 50, "refill_ms": 100,
                                      "one_time_burst": count - 50}})
    qemu = _qemu_side(image, "throttling.iops-total=500,throttling.iops-total-max=1000,"
                             "throttling.iops-total-max-length=1")
    done = f"blk-bench rw=read qd={qd} n={count} done"
    for _ in range(runs):
        pair = []
        for side in (avmm, qemu):
            per = per_unit(lambda s=side: checked(s, _cmd(count, qd), done, figure.name),
                           lambda s=side: checked(s, _cmd(0, qd), "done", figure.name),
                           count, figure.name, figure)
            pair.append(per * count * 1000)
        figure.add(*pair)
    log(f"benchmarks: {figure.name}: avmm {figure.avmm} ms, QEMU {figure.qemu} ms")
    return figure
