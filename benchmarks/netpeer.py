"""The host side of ``net-bench`` receive runs: a process that keeps a tap busy with
benchmark frames (ethertype 0x88B6, ``AVMMBNCH``, see tests/guest/README.md) until it is
told to stop.

    ip netns exec NS python -m benchmarks.netpeer TAP SIZE [LIFETIME_S]

It runs in the tap's network namespace (``ip netns exec``), writes to the tap through an
AF_PACKET socket, so the frames go out to whatever VMM holds the tap, and stops on
SIGTERM/SIGINT or after LIFETIME_S (default 120) seconds, printing the number of frames
it sent. A separate process, not a thread: a sender in the benchmark's own process would
fight an in-process avmm for the GIL.

It never waits for the VMM: a tap has no back-pressure towards the host (the kernel drops
what the VMM does not read in time), so the VMM and the guest set the pace and the
frames/s measured are what the VMM delivers. While the tap's queue is full the sender
yields the CPU briefly (see :data:`MAX_PAUSE_S`) rather than spinning on drops.
"""

from __future__ import annotations

import signal
import socket
import sys
import time

BENCH_ETHERTYPE = 0x88B6
BENCH_MAGIC = b"AVMMBNCH"
#: Source MAC of the frames: locally administered, unicast.
SENDER_MAC = bytes.fromhex("020000000002")
#: Frames per burst before the sender looks at the clock and its drop count.
BURST = 256
#: Pause after a burst while the tap drops frames (the VMM is not keeping up): it doubles
#: while drops go on, up to the maximum, and halves when a burst went through without any.
#: The kernel drops beyond the tap's queue anyway, and a sender that spins would take a
#: CPU from the VMM on a small machine. At the maximum, a burst per pause still feeds
#: more than BURST / MAX_PAUSE_S frames/s, far above what a VMM here delivers.
MIN_PAUSE_S = 0.00005
MAX_PAUSE_S = 0.001


def bench_frame(size: int) -> bytes:
    """A broadcast benchmark frame of ``size`` bytes (22..1514)."""
    if not 22 <= size <= 1514:
        raise ValueError(f"frame size {size}: must be 22..1514")
    header = b"\xff" * 6 + SENDER_MAC + BENCH_ETHERTYPE.to_bytes(2, "big") + BENCH_MAGIC
    return header + bytes(i & 0xFF for i in range(len(header), size))


def _tx_dropped(tap: str) -> int:
    # /sys/class/net is this namespace's under `ip netns exec` (it remounts /sys).
    with open(f"/sys/class/net/{tap}/statistics/tx_dropped") as f:
        return int(f.read())


def send_until_stopped(tap: str, size: int, lifetime: float) -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    frame = bench_frame(size)
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((tap, 0))
        send = sock.send
        deadline = time.monotonic() + lifetime
        dropped = _tx_dropped(tap)
        pause = 0.0
        print("ready", flush=True)
        while not stop and time.monotonic() < deadline:
            for _ in range(BURST):
                try:
                    send(frame)
                except OSError:
                    break  # no carrier yet (no VMM on the tap): try again after a pause
                sent += 1
            now_dropped = _tx_dropped(tap)
            if now_dropped != dropped:
                dropped = now_dropped
                pause = min(pause * 2, MAX_PAUSE_S) if pause else MIN_PAUSE_S
            elif pause:
                pause = pause / 2 if pause > MIN_PAUSE_S else 0.0
            if pause:
                time.sleep(pause)
    return sent


if __name__ == "__main__":
    lifetime = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
    print(f"sent {send_until_stopped(sys.argv[1], int(sys.argv[2]), lifetime)}", flush=True)
