"""Doing one thing inside a named network namespace (``ip netns add NAME``).

A tap belongs to the network namespace of the thread that opened ``/dev/net/tun``. To
attach to a tap that lives in another namespace, avmm opens it from a short-lived
thread that has switched its own namespace with setns(2); the rest of the process stays
where it was, and the tap fd keeps working from any thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from .errors import AvmmError

T = TypeVar("T")

CLONE_NEWNET = 0x4000_0000
NETNS_DIR = "/run/netns"


class NetnsError(AvmmError):
    """A network namespace could not be entered."""


def call_in_netns(netns: str, function: Callable[[], T]) -> T:
    """Run ``function`` on a thread inside network namespace ``netns``; return its result
    (or raise its exception)."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            outcome["error"] = NetnsError(
                f"cannot open network namespace {netns!r}: {e.strerror}; "
                f"create it with `ip netns add {netns}`")
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                outcome["error"] = NetnsError(
                    f"cannot enter network namespace {netns!r}: {os.strerror(error)} "
                    "(needs CAP_SYS_ADMIN)")
                return
        finally:
            os.close(fd)
        try:
            outcome["value"] = function()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=body, name=f"avmm netns {netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
