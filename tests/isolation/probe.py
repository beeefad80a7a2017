"""A process that loads one seccomp filter and then tries calls, one line per try.

    python -m tests.isolation.probe MODE TARGET CALL...

TARGET is a thread kind (``vcpu``, ``io``, ``loop``, ``backend``: the filter is loaded
on a new thread, which then makes the calls), ``io-owned`` (the device I/O filter built
for the fds a disk's thread would own: the scratch file and the pipe, stdout, stderr),
``process`` (the dense process's union, loaded with TSYNC from the main thread) or
``daemon`` (``avmm serve``'s filters, loaded as it does from its event-loop thread,
the main thread here; a helper thread of trio's cache exists before). Each CALL prints
``CALL ok`` or ``CALL errno=NAME`` before the next one runs, so a test sees how far the
process got before SIGSYS killed it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import outcome
import structlog
import trio

from avmm.isolation import (
    SeccompMode,
    ThreadKind,
    install_process_filter,
    install_thread_filter,
    ip_sockets,
)
from avmm.isolation.ip_sockets import install_daemon_filters
from avmm.isolation.seccomp import DENSE_PROCESS_KINDS
from avmm.logs import configure_logging
from avmm.migration.transport import _tcp_listener
from avmm.ratelimit import BucketConfig, RateLimitConfig, SharedRateLimiter
from avmm.virtio.blk import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SYS_GETPID = 39
X32_SYSCALL_BIT = 0x40000000
SYS_PTRACE = 101
SOCK_PACKET = 10  # the legacy link-level type of AF_INET (<linux/net.h>)
ETH_P_ALL = 3
PTRACE_TRACEME = 0

# Made before the filter: files, fds and executable memory the calls use.
_scratch = tempfile.TemporaryFile()  # noqa: SIM115 - open for the whole run
_scratch.write(b"x" * 4096)
_scratch.flush()
_devnull = os.open("/dev/null", os.O_RDWR)
_pipe = os.pipe()
# mov eax, 20 (getpid in the i386 table); int 0x80; ret
_i386_code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
_i386_code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")
_i386_getpid = ctypes.CFUNCTYPE(ctypes.c_int)(
    ctypes.addressof(ctypes.c_char.from_buffer(_i386_code)))
# A daemon-wide rate-limit group's shared memory, as the daemon makes it and a worker
# maps it (a description of its own: the admission takes its OFD lock).
_group = SharedRateLimiter.create(RateLimitConfig(ops=BucketConfig(size=1000, refill_ms=1000)),
                                  name="probe")
_group_view = SharedRateLimiter.attach(_group.handout_fd(), name="probe")


def _shared_admission() -> None:
    """A request admitted by a group in shared memory (fcntl F_OFD_SETLK, taken and
    released), as a disk's I/O thread of a worker does."""
    busy = _group_view.lock_busy
    assert _group_view.try_take(1, 512, time.monotonic_ns()) == (0, None)
    assert _group_view.lock_busy == busy


def _raw(result: int) -> None:
    if result < 0:
        number = ctypes.get_errno() if result == -1 else -result
        raise OSError(number, os.strerror(number))


def _ioctl(name: str) -> None:
    from avmm.kvm._kvm_ffi import lib

    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    _raw(libc.ioctl(_devnull, getattr(lib, name), 0))


def _pipe_round_trip() -> None:
    os.write(_pipe[1], b"ping")
    assert os.read(_pipe[0], 4) == b"ping"


def _disk_io() -> None:
    assert os.preadv(_scratch.fileno(), [bytearray(512)], 0) == 512
    assert os.pwritev(_scratch.fileno(), [b"y" * 512], 512) == 512
    os.fdatasync(_scratch.fileno())


def _discard() -> None:
    """A DISCARD of a disk's I/O thread: a hole punched in the image (EOPNOTSUPP where
    the file system cannot is a filter that let it through)."""
    try:
        fallocate(_scratch.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 512)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise


def _on_ip_socket_thread(family: int, kind: int, protocol: int = 0) -> None:
    """A socket made by ``avmm serve``'s IP-socket thread (the error it got, if any)."""
    ip_sockets.call(lambda: socket.socket(family, kind, protocol).close())


def _on_helper(function: Callable[[], object]) -> None:
    """``function`` on a thread of trio's cache (what ``trio.to_thread`` runs jobs on)."""
    results: queue.SimpleQueue[outcome.Outcome[object]] = queue.SimpleQueue()
    trio.lowlevel.start_thread_soon(function, results.put)
    results.get().unwrap()


def _i386() -> None:
    # int 0x80 returns -errno in eax; without a filter it is our pid.
    result = _i386_getpid()
    if result != os.getpid():
        _raw(result if result < 0 else -errno.EINVAL)


def _log_exception() -> None:
    """avmm's own logging of an internal error with its traceback (what a vCPU loop or
    the virtio-mmio transport does on its thread when avmm has a bug)."""
    try:
        raise ValueError("an internal error")
    except ValueError:
        structlog.get_logger("probe").exception("probe failed on purpose")


CALLS: dict[str, Callable[[], object]] = {
    # permitted work
    "pipe": _pipe_round_trip,
    "disk-io": _disk_io,
    "kvm-run": lambda: _ioctl("KVM_RUN"),         # ENOTTY on /dev/null: it got through
    "thread": lambda: threading.Thread(target=lambda: None).start(),
    "getpid": lambda: _raw(libc.syscall(SYS_GETPID)),
    "discard": _discard,
    # an open fd that a disk's I/O thread does not own
    "write-other": lambda: os.write(_devnull, b"x"),
    "fsync-other": lambda: os.fsync(_devnull),
    "shared-admission": _shared_admission,
    # an fcntl command other than the OFD lock's
    "fcntl-setfl": lambda: fcntl.fcntl(_devnull, fcntl.F_SETFL, os.O_NONBLOCK),
    # forbidden everywhere
    "execve": lambda: os.execv("/bin/true", ["true"]),
    "fork": lambda: _fork(),  # clone without CLONE_THREAD: a process, never allowed
    "ptrace": lambda: _raw(libc.syscall(SYS_PTRACE, PTRACE_TRACEME, 0, 0, 0)),
    "mount": lambda: _raw(libc.mount(b"none", b"/nonexistent", b"tmpfs", 0, None)),
    "x32-getpid": lambda: _raw(libc.syscall(SYS_GETPID | X32_SYSCALL_BIT)),
    "i386-getpid": _i386,
    # forbidden on some kinds
    "inet-socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
    "udp-socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close(),
    "tcp6-socket": lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM,
                                         socket.IPPROTO_TCP).close(),
    # what the daemon's IP sockets must never be: raw IP, link-level frames (through
    # AF_INET's legacy SOCK_PACKET, or AF_PACKET), ICMP, SCTP, netlink
    "raw-socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                        socket.IPPROTO_RAW).close(),
    "inet-packet-socket": lambda: socket.socket(socket.AF_INET, SOCK_PACKET,
                                                socket.htons(ETH_P_ALL)).close(),
    "packet-socket": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                           socket.htons(ETH_P_ALL)).close(),
    "icmp-socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM,
                                         socket.IPPROTO_ICMP).close(),
    "sctp-socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                         socket.IPPROTO_SCTP).close(),
    "netlink-socket": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close(),
    "openat": lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)),
    # avmm serve: IP sockets only from its IP-socket thread
    "ip-thread-socket": lambda: _on_ip_socket_thread(socket.AF_INET, socket.SOCK_STREAM),
    "ip-thread-udp6-socket": lambda: _on_ip_socket_thread(socket.AF_INET6,
                                                          socket.SOCK_DGRAM),
    "ip-thread-raw-socket": lambda: _on_ip_socket_thread(socket.AF_INET, socket.SOCK_RAW,
                                                         socket.IPPROTO_RAW),
    "ip-thread-listen": lambda: ip_sockets.call(
        _tcp_listener, "127.0.0.1", 0).close(),
    "ip-thread-resolve": lambda: ip_sockets.call(socket.getaddrinfo, "localhost", 80),
    "ip-thread-netlink-socket": lambda: _on_ip_socket_thread(socket.AF_NETLINK,
                                                             socket.SOCK_RAW),
    "helper-inet-socket": lambda: _on_helper(CALLS["inet-socket"]),
    "helper-openat": lambda: _on_helper(CALLS["openat"]),
    "kvm-create-vm": lambda: _ioctl("KVM_CREATE_VM"),
    # avmm's own work that must never die of the filter
    "log-exception": _log_exception,
}


def _fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _try(names: list[str]) -> None:
    for name in names:
        try:
            CALLS[name]()
        except OSError as e:
            print(f"{name} errno={errno.errorcode.get(e.errno or 0, e.errno)}", flush=True)
        else:
            print(f"{name} ok", flush=True)


def main(argv: list[str]) -> int:
    mode, target, names = SeccompMode(argv[0]), argv[1], argv[2:]
    configure_logging(level="error")  # as avmm's front doors do, before any filter
    if target == "process":
        install_process_filter(DENSE_PROCESS_KINDS, mode)
        _try(names)
        return 0
    if target == "daemon":
        _on_helper(lambda: None)  # a helper thread, idle in trio's cache from now on
        install_daemon_filters(mode)
        _try(names)
        return 0
    owned = None
    if target == "io-owned":
        target, owned = "io", {_scratch.fileno(), *_pipe, 1, 2}
    kind = ThreadKind(target)

    def body() -> None:
        install_thread_filter(kind, mode, fds=owned)
        print("filter loaded", flush=True)
        _try(names)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
