"""A worker program for tests only (``Spawner(worker_module=...)``), without a VM or a
jail: this process stands for a worker's reaper, and on request (``b"o"`` on the
channel) it forks a child that stands for the jailed process, in the reaper's process
group, which resets its parent-death signal (what a jailed process a guest took over
could do: ``prctl(PR_SET_PDEATHSIG, 0)``), sends its PID over the channel and sleeps.
The reaper exits 0 once the test closes its end of the channel."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


def run_worker(channel_fd: int) -> int:
    channel = socket.socket(fileno=channel_fd)
    while command := channel.recv(1):
        if command != b"o":
            continue
        if os.fork() == 0:
            code = 70
            try:
                # As the jail sets it, then as a hostile jailed process resets it.
                _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                _prctl(_PR_SET_PDEATHSIG, 0)
                channel.send(str(os.getpid()).encode())
                while True:
                    signal.pause()
            finally:
                os._exit(code)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--channel-fd", type=int, required=True)
    sys.exit(run_worker(parser.parse_args().channel_fd))
