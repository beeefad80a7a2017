"""The ``fairness`` group, network part: how closely a NIC's frame-rate limiters hold
their goal, TX and RX limited separately (``tx_rate_limit``, ``rx_rate_limit``).

The test guest's ``net-bench`` moves 64-byte frames through a tap in a private network
namespace, as in ``benchmarks/net.py``: on transmit the host kernel is the sink (the tap's
``rx_packets`` confirms every frame arrived), on receive ``benchmarks/netpeer.py`` keeps
the tap's queue full. The NIC's limit in the measured direction is 2000 frames per second
(an ops bucket of 200, refilled in 100 ms); the other direction is unlimited.

A rate is measured past the bucket's initial content, as for the disks
(``benchmarks/fairness_io.py``): a run of ``n0 + n`` frames minus a run of ``n0``, ``n``
divided by the difference. Goal: the limit ± 10 %. avmm alone: QEMU's ``-netdev`` has no
frame-rate limiter to set beside it, so the figures sit with the other goals under
"Sharing a host".
"""

from __future__ import annotations

import contextlib
from typing import Any

from benchmarks.common import SHARING, BenchError, Figure, avmm_run_sync, checked, log, per_unit
from benchmarks.net import GUEST_MAC, sender, tap_rx_packets

__all__ = ["bench_fairness_net"]

FRAMES_PER_SECOND = 2000
LIMIT = {"ops": {"size": FRAMES_PER_SECOND // 10, "refill_ms": 100}}
WARM = 2 * FRAMES_PER_SECOND // 10  # n0: past the bucket
SIZE = 64


def bench_fairness_net(runs: int, seconds: float) -> list[Figure]:
    """TX and RX figures; each steady-rate run lasts about ``seconds`` past its warm-up."""
    from tests.prerequisites import net_problem
    from tests.virtio_guest_support import TapNamespace

    problem = net_problem()
    if problem is not None:
        raise BenchError(f"fairness (net limits): {problem}")
    n = max(int(FRAMES_PER_SECOND * seconds), 10)
    with TapNamespace() as namespace:
        return [_measure(namespace, direction, runs, n) for direction in ("tx", "rx")]


def _measure(namespace: Any, direction: str, runs: int, n: int) -> Figure:
    from avmm.config import NetConfig, parse_rate_limit

    key = f"{direction}_rate_limit"
    net = NetConfig(tap=namespace.tap, mac=bytes.fromhex(GUEST_MAC.replace(":", "")),
                    netns=namespace.netns, **{key: parse_rate_limit(LIMIT, key)})
    label = "TX guest → host" if direction == "tx" else "RX host → guest"
    figure = Figure(
        f"rate limit: net {label} {SIZE} B frames, limit {FRAMES_PER_SECOND}/s "
        f"(goal {FRAMES_PER_SECOND} frames/s)", "frames/s", "closer", SHARING,
        note=f"{key} ops bucket of {LIMIT['ops']['size']} refilled in 100 ms; steady rate "
             "past the bucket; goal ± 10 %")
    what = f"net-bench {direction} under {key}"

    def run(cmdline: str) -> tuple[float, str]:
        result = avmm_run_sync(cmdline, nets=[net])
        return result.seconds, result.output

    def cmd(count: int) -> str:
        return f"avmm.test=net-bench avmm.dir={direction} avmm.size={SIZE} avmm.n={count}"

    def loaded() -> float:
        count = WARM + n
        before = tap_rx_packets(namespace.netns, namespace.tap)
        seconds = checked(run, cmd(count), f"net-bench dir={direction} size={SIZE} "
                                           f"n={count} done", what)
        if direction == "tx":
            arrived = tap_rx_packets(namespace.netns, namespace.tap) - before
            if arrived < count:
                raise BenchError(f"{what}: the guest sent {count} frames, the tap got "
                                 f"{arrived}")
        return seconds

    source = (sender(namespace.command_prefix(), namespace.tap, SIZE)
              if direction == "rx" else contextlib.nullcontext())
    with source:
        for _ in range(runs):
            per_frame = per_unit(loaded, lambda: checked(run, cmd(WARM), "done", what), n,
                                 what, figure)
            figure.avmm.append(1 / per_frame)
    log(f"benchmarks: {figure.name}: {figure.avmm} (goal {FRAMES_PER_SECOND} ± 10 %)")
    return figure
