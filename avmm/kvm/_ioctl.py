"""The one place where ioctls are issued: every return value is checked here."""

from __future__ import annotations

import errno
from typing import Any

from ..errors import KvmError
from ._kvm_ffi import ffi, lib

NO_ARGUMENT = ffi.cast("unsigned long", 0)


def ioctl(fd: int, name: str, argument: Any = NO_ARGUMENT) -> int:
    """Issue ioctl ``name`` (a ``KVM_*`` macro name) on ``fd``; raise KvmError on failure.

    ``argument`` is a cffi pointer, or an int passed as ``unsigned long``. The ioctl
    number comes from ``<linux/kvm.h>`` via cffi. cffi releases the GIL for the call, so
    a blocking KVM_RUN does not stall other threads.
    """
    if isinstance(argument, int):
        argument = ffi.cast("unsigned long", argument)
    number = getattr(lib, name)
    while True:
        result = lib.ioctl(fd, number, argument)
        if result >= 0:
            return int(result)
        error = ffi.errno
        # A signal (a vCPU kick aimed at another thread, a profiler's timer) can interrupt
        # a KVM ioctl before it did anything, e.g. KVM_CREATE_VM: retry those. KVM_RUN
        # never comes here (Vcpu.run turns its EINTR into an Interrupted exit).
        if error != errno.EINTR or name == "KVM_RUN":
            raise KvmError(name, error)
