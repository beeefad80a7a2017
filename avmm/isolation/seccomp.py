"""Seccomp filters, one per thread kind (issue 14, step one).

The allow-lists live in :mod:`avmm.isolation.syscalls`; this module turns them into
filters through libseccomp (the ``pyseccomp`` ctypes binding, imported only when a filter
is built: its import runs ``ldconfig``) and loads them.

Two entry points:

- :func:`install_process_filter` loads the union of the kinds a process runs (a dense
  ``avmm up``, an ``avmm backend``) on every thread of the process at once (TSYNC), before
  any thread loaded a filter of its own, and remembers the mode for the threads below.
- :func:`install_thread_filter` loads one kind's filter on the calling thread only (no
  TSYNC). Filters stack: a vCPU thread of a dense process runs under the process union
  *and* the vCPU list, and the stricter answer wins. A thread that loaded a filter keeps
  it until it exits, so such threads never go back to trio's thread cache (see
  :func:`avmm.threads.run_in_own_thread`).

``avmm serve`` uses both, in the order :mod:`avmm.isolation.ip_sockets` explains: its
event loop stacks the daemon's list on the process filter, and one thread of its own may
make IP sockets.

Modes (``--seccomp``): ``kill`` (the default action kills the whole process with SIGSYS,
as Firecracker does), ``errno`` (the call fails with EPERM), ``log`` (the call is allowed
and the kernel logs it: ``dmesg | grep 'type=1326'``), ``off``. A call from another
architecture's table (i386 ``int 0x80``, x32 numbers with bit 30 set) gets the same action
as an unlisted call: libseccomp checks ``AUDIT_ARCH_X86_64`` and refuses x32 numbers in
the x86_64 filter.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import threading
from collections.abc import Collection, Iterable
from typing import Any

import structlog

from ..errors import AvmmError
from .syscalls import (
    ALLOWED,
    CONDITIONAL,
    FD_CALLS,
    IOCTLS,
    OTHER_IOCTLS,
    SOCKETS,
    SOCKETS_REFUSED,
    ThreadKind,
)

log = structlog.get_logger(__name__)


class SeccompMode(enum.Enum):
    KILL = "kill"
    ERRNO = "errno"
    LOG = "log"
    OFF = "off"


SECCOMP_MODES = [mode.value for mode in SeccompMode]


class SeccompError(AvmmError):
    """A seccomp filter could not be built or loaded."""


# The mode the per-thread filters use in this process; set by install_process_filter().
_thread_mode = SeccompMode.OFF
#: Per thread: the kind whose filter this thread loaded (see thread_filter_kind).
_loaded = threading.local()
_mode_lock = threading.Lock()

_PR_SET_NAME = 15


def thread_filter_kind() -> ThreadKind | None:
    """The kind whose own filter the calling thread loaded, or None. If that kind's list
    has no openat (a vCPU or device I/O thread), the thread may not open files: whatever
    would read one there (formatting a traceback reads the source) must do without (see
    avmm.logs)."""
    return getattr(_loaded, "kind", None)


def thread_filter_mode() -> SeccompMode:
    """The mode per-thread filters are loaded in (OFF until a process filter is)."""
    return _thread_mode


def build_filter(kinds: Iterable[ThreadKind], mode: SeccompMode, *,
                 refused_ioctls: Iterable[str] = (),
                 fds: Collection[int] | None = None) -> Any:
    """A ``pyseccomp.SyscallFilter`` allowing what any of ``kinds`` needs (not loaded),
    less the ioctl requests named in ``refused_ioctls``; with ``fds``, the calls of
    :data:`~avmm.isolation.syscalls.FD_CALLS` only on those fds."""
    if mode is SeccompMode.OFF:
        raise ValueError("no filter in mode off")
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as e:  # RuntimeError: libseccomp.so.2 not found
        raise SeccompError(f"cannot load libseccomp ({e}); install libseccomp2 or run "
                           "with --seccomp off") from e
    action = {
        SeccompMode.KILL: pyseccomp.KILL_PROCESS,
        SeccompMode.ERRNO: pyseccomp.ERRNO(errno.EPERM),
        SeccompMode.LOG: pyseccomp.LOG,
    }[mode]
    kinds = frozenset(kinds)
    try:
        syscall_filter = pyseccomp.SyscallFilter(action)
        # The filter holds the native arch only (x86_64): a call made through another
        # table gets the same action as an unlisted one.
        syscall_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, action)
        names = set().union(*(ALLOWED[kind] for kind in kinds))
        conditional = _conditional_rules(kinds, names, frozenset(refused_ioctls))
        if "clone" in names:
            # New threads only: clone with CLONE_THREAD. A new process (fork, vfork,
            # posix_spawn) gets the filter's action, and clone3, whose flags are in
            # memory where a filter cannot look, answers ENOSYS, so that glibc's
            # pthread_create falls back to clone.
            names -= {"clone", "clone3"}
            syscall_filter.add_rule(pyseccomp.ALLOW, _syscall_number(pyseccomp, "clone"),
                                    pyseccomp.Arg(0, pyseccomp.MASKED_EQ, _CLONE_THREAD,
                                                  _CLONE_THREAD))
            syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS),
                                    _syscall_number(pyseccomp, "clone3"))
        if fds is not None:
            fd_calls, names = names & FD_CALLS, names - FD_CALLS
            for name in sorted(fd_calls):
                number = _syscall_number(pyseccomp, name)
                # One rule per fd; the kernel reads the fd as an unsigned int.
                for fd in sorted(set(fds)):
                    syscall_filter.add_rule(pyseccomp.ALLOW, number, pyseccomp.Arg(
                        0, pyseccomp.MASKED_EQ, 0xFFFFFFFF, fd))
        for name in sorted(names):
            syscall_filter.add_rule(pyseccomp.ALLOW, _syscall_number(pyseccomp, name))
        for name, (index, values) in sorted(conditional.items()):
            number = _syscall_number(pyseccomp, name)
            # Compare the low 32 bits only: these arguments (an ioctl request, a socket
            # domain) are ints in the kernel, whatever the upper half holds.
            for value in sorted(values):
                syscall_filter.add_rule(pyseccomp.ALLOW, number, pyseccomp.Arg(
                    index, pyseccomp.MASKED_EQ, 0xFFFFFFFF, value & 0xFFFFFFFF))
        _add_socket_rules(pyseccomp, syscall_filter, kinds)
    except OSError as e:
        raise SeccompError(f"building the seccomp filter failed: {e.strerror}") from e
    return syscall_filter


_CLONE_THREAD = 0x00010000

#: socket()'s type without SOCK_NONBLOCK/SOCK_CLOEXEC (the kernel's SOCK_TYPE_MASK).
_SOCK_TYPE_MASK = 0xF


def _add_socket_rules(pyseccomp: Any, syscall_filter: Any,
                      kinds: frozenset[ThreadKind]) -> None:
    """socket(domain, type, protocol) allowed for exactly the triples of ``kinds``
    (:data:`avmm.isolation.syscalls.SOCKETS`): each rule compares every argument it
    names (all must match); the domains of
    :data:`~avmm.isolation.syscalls.SOCKETS_REFUSED` fail with EAFNOSUPPORT."""
    number = _syscall_number(pyseccomp, "socket")
    for domain in sorted(set().union(*(SOCKETS_REFUSED.get(k, frozenset()) for k in kinds))):
        syscall_filter.add_rule(pyseccomp.ERRNO(errno.EAFNOSUPPORT), number,
                                pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 0xFFFFFFFF, domain))
    for domain, kind, protocol in sorted(set().union(*(SOCKETS[k] for k in kinds)),
                                         key=lambda rule: tuple(-1 if v is None else v
                                                                for v in rule)):
        checks = [pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 0xFFFFFFFF, domain)]
        if kind is not None:
            checks.append(pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _SOCK_TYPE_MASK, kind))
        if protocol is not None:
            checks.append(pyseccomp.Arg(2, pyseccomp.MASKED_EQ, 0xFFFFFFFF, protocol))
        syscall_filter.add_rule(pyseccomp.ALLOW, number, *checks)


def _syscall_number(pyseccomp: Any, name: str) -> int:
    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    if number < 0:
        raise SeccompError(f"libseccomp does not know the syscall {name!r}")
    return number


def _conditional_rules(kinds: frozenset[ThreadKind], names: set[str],
                       refused_ioctls: frozenset[str] = frozenset(),
                       ) -> dict[str, tuple[int, set[int]]]:
    """The argument-checked rules of ``kinds`` (merged), less those that one of the kinds
    allows whatever the argument (in ``names``) and those with no value left; no ioctl
    request named in ``refused_ioctls``."""
    from ..kvm._kvm_ffi import lib

    rules: dict[str, tuple[int, set[int]]] = {}
    for kind in kinds:
        per_kind = dict(CONDITIONAL[kind])
        per_kind["ioctl"] = (1, frozenset(
            OTHER_IOCTLS[name] if name in OTHER_IOCTLS else int(getattr(lib, name))
            for name in IOCTLS[kind] - refused_ioctls))
        for name, (index, values) in per_kind.items():
            known_index, known = rules.setdefault(name, (index, set()))
            if known_index != index:
                raise SeccompError(f"two kinds check different arguments of {name}")
            known.update(values)
    return {name: rule for name, rule in rules.items() if name not in names and rule[1]}


def install_process_filter(kinds: Iterable[ThreadKind], mode: SeccompMode, *,
                           refused_ioctls: Iterable[str] = ()) -> None:
    """Load the union of ``kinds``' lists (less the ioctl requests in ``refused_ioctls``)
    on every thread of this process (TSYNC) and load per-thread filters in ``mode`` from
    now on. Call it before any thread loaded a filter of its own (TSYNC fails otherwise)
    and after the imports that run programs."""
    global _thread_mode
    kinds = frozenset(kinds)
    if mode is SeccompMode.OFF:
        log.warning("seccomp filters are off: nothing limits the syscalls of this process")
        return
    if mode is not SeccompMode.KILL:
        log.warning("seccomp in a debugging mode: unlisted syscalls are not fatal",
                    mode=mode.value)
    import pyseccomp

    syscall_filter = build_filter(kinds, mode, refused_ioctls=refused_ioctls)
    with _mode_lock:
        try:
            syscall_filter.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
            syscall_filter.load()
        except OSError as e:
            raise SeccompError(f"loading the process seccomp filter failed: {e.strerror}") \
                from e
        _thread_mode = mode
    log.info("seccomp process filter loaded", mode=mode.value,
             kinds=sorted(kind.value for kind in kinds))


def install_thread_filter(kind: ThreadKind, mode: SeccompMode | None = None, *,
                          fds: Collection[int] | None = None, rename: bool = True) -> None:
    """Load ``kind``'s filter on the calling thread (only), in ``mode`` or in the mode
    of the process filter; nothing in mode off. Names the thread ``avmm-<kind>`` first
    (what the kernel's seccomp log lines and ``strace`` show as comm) unless ``rename``
    is false (the main thread's name is the process's). With ``fds``, the
    calls of :data:`~avmm.isolation.syscalls.FD_CALLS` are allowed on those fds only (a
    device I/O thread's own: see there)."""
    mode = _thread_mode if mode is None else mode
    if mode is SeccompMode.OFF:
        return
    if rename:
        _set_thread_name(f"avmm-{kind.value}")
    syscall_filter = build_filter([kind], mode, fds=fds)
    try:
        syscall_filter.load()
    except OSError as e:
        raise SeccompError(f"loading the {kind.value} seccomp filter failed: {e.strerror}") \
            from e
    _loaded.kind = kind


_libc = ctypes.CDLL(None, use_errno=True)


def _set_thread_name(name: str) -> None:
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


#: The kinds a dense VMM process runs (``avmm up``; later ``avmm serve --isolation none``).
DENSE_PROCESS_KINDS = frozenset({ThreadKind.EVENT_LOOP, ThreadKind.VCPU, ThreadKind.DEVICE_IO})
#: The kinds an ``avmm serve`` process runs (``--isolation none``: every VM in it), its
#: IP-socket thread included (see avmm.isolation.ip_sockets).
DAEMON_PROCESS_KINDS = DENSE_PROCESS_KINDS | {ThreadKind.DAEMON, ThreadKind.IP_SOCKETS}
#: The kinds an ``avmm backend`` process runs.
BACKEND_PROCESS_KINDS = frozenset({ThreadKind.BACKEND, ThreadKind.DEVICE_IO})

#: What ``--seccomp`` defaults to.
DEFAULT_MODE = SeccompMode.KILL


def add_seccomp_argument(parser: Any) -> None:
    """``--seccomp kill|errno|log|off`` on an argparse (sub)parser."""
    parser.add_argument(
        "--seccomp", choices=SECCOMP_MODES, default=DEFAULT_MODE.value,
        help="syscall filters per thread kind (see README: Isolation and security): "
             "kill the process on a call outside the lists (default: "
             f"{DEFAULT_MODE.value}), fail it with EPERM (errno), allow and log it to the "
             "kernel log (log), or no filter (off)")
