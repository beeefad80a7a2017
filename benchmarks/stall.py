"""Guest-visible downtime, measured the same way for every VMM: the longest time the test
guest's progress word stood still, watched from outside the VMMs.

A sampler process reads one u64 of guest RAM (the ``count`` loop's mailbox counter, or
``mem-walk``'s progress word, mailbox scratch word 0) in the source's and the
destination's RAM through ``/proc/PID/mem`` every :data:`INTERVAL_S`, and takes the
larger of the two: guest RAM only ever holds what the guest wrote, so the larger value
is the furthest the guest has got, on whichever side it runs. The longest interval
between two changes of that value, from just before the migration starts until the
guest is seen running on the destination, is the guest-visible downtime: the pause for
the hand-over, as the guest would see it on a wall clock, whatever each VMM counts as
its own ``downtime``. Its resolution is the sampling interval plus the guest's own
update interval (about 0.4 ms for ``count``, 0.12 ms for a paced ``mem-walk``).

``python -m benchmarks.stall MEMORY_BYTES WORD_ADDRESS PID [PID ...]``: prints
``ready`` once the word moved in one of the processes, then samples until a line comes
on stdin and prints the result as one JSON line.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from benchmarks.common import REPO, BenchError
from benchmarks.snapshot import ProcessRam

#: Time between samples; the sampler sleeps between them so as not to take a CPU from
#: the VMMs it watches (this machine has two).
INTERVAL_S = 0.0002
#: How often a process whose RAM was not found yet is looked for again.
RESCAN_S = 0.005
#: The longest the sampler waits for the word to move before it gives up.
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class Stall:
    longest_ms: float
    samples: int
    median_interval_ms: float


class _Word:
    """The progress word in one process's guest RAM (None until its RAM is found)."""

    def __init__(self, pid: int, memory_bytes: int, address: int) -> None:
        self.ram = ProcessRam(pid, memory_bytes)
        self.address = address
        self.next_scan = 0.0

    def read(self, now: float) -> int | None:
        if self.ram.base is None:
            if now < self.next_scan:
                return None
            self.next_scan = now + RESCAN_S
            if self.ram.mailbox() is None:
                return None
        try:
            return int.from_bytes(self.ram.read(self.address, 8), "little")
        except OSError:
            return None  # the process ended or let go of its RAM


def sample(pids: list[int], memory_bytes: int, address: int, stop: threading.Event) -> Stall:
    words = [_Word(pid, memory_bytes, address) for pid in pids]
    best: int | None = None
    changed_at = 0.0
    longest = 0.0
    times: list[float] = []
    ready = False
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set():
        now = time.monotonic()
        values = [v for v in (w.read(now) for w in words) if v is not None]
        value = max(values) if values else None
        if value is not None and (best is None or value > best):
            if best is not None:
                if not ready:
                    print("ready", flush=True)
                    ready = True
                    changed_at = now
                else:
                    longest = max(longest, now - changed_at)
                    changed_at = now
            best = value
        if ready:
            times.append(now)
        elif now > deadline:
            raise BenchError(f"the guest's progress word never moved in {pids}")
        time.sleep(INTERVAL_S)
    intervals = sorted(b - a for a, b in itertools.pairwise(times))
    median = intervals[len(intervals) // 2] if intervals else 0.0
    for w in words:
        w.ram.close()
    return Stall(round(longest * 1000, 2), len(times), round(median * 1000, 3))


def main(argv: list[str]) -> int:
    memory_bytes, address = int(argv[0]), int(argv[1], 0)
    pids = [int(p) for p in argv[2:]]
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    result = sample(pids, memory_bytes, address, stop)
    print(json.dumps(result.__dict__), flush=True)
    return 0


class StallWatch:
    """The sampler as a child process: started once the guest runs, stopped once it ran
    on the destination."""

    def __init__(self, pids: list[int], memory_bytes: int, address: int) -> None:
        argv = [sys.executable, "-m", "benchmarks.stall", str(memory_bytes), hex(address),
                *(str(p) for p in pids)]
        self.process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            _, err = self.process.communicate()
            raise BenchError(f"stall sampler: {line.strip() or err[-1000:]}")

    def stop(self) -> Stall:
        out, err = self.process.communicate("stop\n", timeout=30)
        if self.process.returncode != 0 or not out.strip():
            raise BenchError(f"stall sampler exited {self.process.returncode}: {err[-1000:]}")
        return Stall(**json.loads(out.strip().splitlines()[-1]))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
