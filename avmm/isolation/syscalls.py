"""What each kind of avmm thread may call: the seccomp allow-lists, in one place.

Derived from what the code really calls: ``scripts/seccomp_derive.py`` runs the guest
workloads of ``tests/isolation/scenarios.py`` (hello, blk-write, virtio console, net echo
through a tap in a netns, vhost-user blk with an ``avmm backend``) under ``strace -f``
with ``--seccomp log`` and prints, per thread kind, the calls made once the thread was
under its filter, what a list lacks and what it allows that no workload used. Every
entry below was either seen there or is kept for a path those workloads do not take,
named in the group's comment (restore, console and API sockets, snapshot files). Run the
script again after changing a device or the event loop; a name not listed is refused with
the filter's default action (see :mod:`avmm.isolation.seccomp`).
"""

from __future__ import annotations

import enum
import fcntl
import socket
import termios

from ..tap import TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ


class ThreadKind(enum.Enum):
    VCPU = "vcpu"          #: a vCPU thread: KVM_RUN and the exits it handles in place
    DEVICE_IO = "io"       #: a device's I/O thread (a disk's ring server)
    EVENT_LOOP = "loop"    #: the trio thread and its helper threads of an avmm VMM
    BACKEND = "backend"    #: the trio thread (and helpers) of an ``avmm backend`` process
    DAEMON = "daemon"      #: the trio thread (and helpers) of ``avmm serve``
    IP_SOCKETS = "ipsock"  #: ``avmm serve``'s one thread that makes IP sockets


# -- shared by every Python thread ---------------------------------------------------------

#: CPython itself: the GIL and locks (futex), the allocator (mmap/munmap/mremap/madvise/
#: mprotect/brk), signals (a vCPU kick is a real-time signal: rt_sigreturn; masks while
#: threads start), thread identity and exit, clocks and sleeps that miss the vDSO, the
#: GIL hand-off's yield, os.urandom.
PYTHON_RUNTIME = frozenset({
    "futex", "mmap", "munmap", "mremap", "madvise", "brk", "mprotect",
    "rt_sigreturn", "rt_sigprocmask", "sigaltstack", "getpid", "gettid", "tgkill",
    "clock_gettime", "clock_nanosleep", "nanosleep", "sched_yield", "getrandom",
    "exit", "exit_group", "restart_syscall",
})

#: Log lines and the guest's serial/console output (stdout, stderr, pipes), eventfds
#: (irqfd writes, kick reads), and waking the event loop from another thread (trio's
#: wake-up socketpair: sendto/recvfrom).
SHARED_IO = frozenset({"write", "writev", "read", "readv", "sendto", "recvfrom"})

# -- per kind ------------------------------------------------------------------------------

#: vCPU threads: the above (seen: futex, ioctl, write, sendto, tgkill, madvise, munmap,
#: rt_sigprocmask, rt_sigreturn, exit) and close (a vhost-user device's eventfds are
#: dropped from the MMIO write that resets it). No open, no sockets, no new threads.
VCPU = PYTHON_RUNTIME | SHARED_IO | frozenset({"close"})

#: Device I/O threads: the disk's request path on the image fd it owns (preadv2/pwritev2,
#: fdatasync; the plain variants for other Pythons; fallocate: DISCARD and WRITE_ZEROES
#: punch holes or zero ranges), sleeping on its kick and stop eventfds (poll/ppoll);
#: fcntl F_OFD_SETLK only (CONDITIONAL below). No open, no sockets, no ioctl. A disk's
#: queue and each of a NIC's two queues have such a thread (readv/writev on the tap are
#: SHARED_IO's); virtio-rng is served on the event loop, under its filter. The calls of
#: FD_CALLS are narrowed further per thread, to the fds it owns (see FD_CALLS).
DEVICE_IO = PYTHON_RUNTIME | SHARED_IO | frozenset({
    "preadv2", "pwritev2", "preadv", "pwritev", "pread64", "pwrite64",
    "fdatasync", "fsync", "fallocate", "poll", "ppoll",
})

#: The calls that act on the fd in their first argument, narrowed on a device I/O thread
#: to the fds it owns when its filter is built with them (``install_thread_filter(...,
#: fds=...)``; a disk's I/O thread: its image, its kick and stop eventfds, the irqfd it
#: signals, and stderr/stdout, where its log lines go). One rule per fd: argument 0
#: equal to it (its low 32 bits: the kernel reads an unsigned int). Left unrestricted,
#: because seccomp cannot check them: poll/ppoll (the fds are in an array in memory,
#: which a filter cannot read), and sendto/recvfrom, which the thread uses on a socket
#: trio owns (its wake-up socketpair: the thread's result goes back to the event loop
#: through it) and whose fd trio does not publish. fcntl stays checked by command only:
#: a PATCH may hand the running thread a rate-limit group whose memfd was opened after
#: the thread started.
FD_CALLS = frozenset({
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "fdatasync", "fsync", "fallocate",
})

#: File work of the event loop and its to_thread helpers: the kernel, initrd and disks
#: (opened while the VM is built), snapshot files and directories (restore: getdents64,
#: fstat), config paths checked by the path policy (readlink, newfstatat, access), the
#: console/API socket files (unlink, chmod, rename), disk images (ftruncate, fallocate),
#: whose a snapshot's memory file is (geteuid: a daemon maps only its own user's), and
#: openat2 (RESOLVE_BENEATH: a config's files under ``--allow-path``). A worker's
#: snapshot is written into two files its daemon made: fstat, ftruncate, lseek
#: (SEEK_DATA/SEEK_HOLE on guest RAM's memfd), pwrite64 and fsync (DEVICE_IO), close.
FILES = frozenset({
    "openat", "close", "fstat", "newfstatat", "statx", "lseek", "fcntl", "dup", "dup3",
    "getdents64", "readlink", "unlink", "unlinkat", "rename", "chmod", "fchmod",
    "ftruncate", "fallocate", "access", "faccessat2", "getcwd", "geteuid", "openat2",
})

#: trio's loop and threads: epoll, its wake-up socketpair, eventfds, pipes, starting
#: helper and vCPU/I/O threads (clone3 + set_robust_list + rseq), naming threads and
#: loading their filters (prctl, seccomp), signal handlers (SIGINT/SIGTERM receivers).
#: clone and clone3 are narrowed when the filter is built (avmm.isolation.seccomp):
#: clone only with CLONE_THREAD (threads, never processes), clone3 answers ENOSYS.
EVENT_MACHINERY = frozenset({
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "poll", "ppoll",
    "eventfd2", "pipe2", "socketpair",
    "clone", "clone3", "set_robust_list", "rseq", "prctl", "seccomp", "rt_sigaction",
})

#: Unix sockets: the vhost-user front-end (connect, fds over sendmsg/recvmsg), the
#: console socket and the API (bind, listen, accept4). ``socket`` itself is allowed for
#: AF_UNIX only (CONDITIONAL below).
UNIX_SOCKETS = frozenset({
    "bind", "listen", "accept4", "connect", "getsockopt", "setsockopt", "getsockname",
    "getpeername", "sendmsg", "recvmsg", "shutdown",
})

#: The event loop of a VMM: all of the above, plus guest RAM (memfd_create), the disk
#: path of a device served from trio (DEVICE_IO), and setns: a tap is opened from a
#: helper thread inside the configured network namespace. Never: execve, fork, ptrace,
#: mount, pivot_root, module, key, bpf, perf or process_vm_* calls.
EVENT_LOOP = (PYTHON_RUNTIME | SHARED_IO | DEVICE_IO | FILES | EVENT_MACHINERY
              | UNIX_SOCKETS | frozenset({"memfd_create", "setns"})
              # CPU controls (avmm.cgroups): a VM's cgroup is made and removed, and its
              # vCPU threads pinned, from the event loop's to_thread helpers.
              | frozenset({"mkdir", "mkdirat", "rmdir", "sched_setaffinity",
                           "sched_getaffinity"}))

#: An ``avmm backend`` process: its listening socket and the front-end's memory, log and
#: inflight fds (mmap, memfd_create), the device's files opened before the filter. No
#: /dev/kvm (no KVM ioctls), no namespaces.
BACKEND = (PYTHON_RUNTIME | SHARED_IO | DEVICE_IO | FILES | EVENT_MACHINERY
           | UNIX_SOCKETS | frozenset({"memfd_create"}))

#: The event loop of ``avmm serve`` (dense mode: every VM's devices in this process):
#: a VMM's event loop, plus snapshot directories renamed into place (renameat2; made with
#: the event loop's mkdirat, their fsync is in DEVICE_IO). No IP sockets: a migration's
#: TCP sockets are made by the IP_SOCKETS thread and used here (connect on a
#: non-blocking socket, accept4, the stream calls: those of UNIX_SOCKETS, on an fd that
#: exists). Derived with ``scripts/seccomp_derive.py serve``. Never execve, fork,
#: ptrace, mount, module or key calls.
DAEMON = EVENT_LOOP | frozenset({"renameat2"}) | frozenset({
    # --isolation process: the worker spawner, the daemon's child (made before the
    # filter), reaped when it ends: only the caller's own children can be waited for.
    "wait4", "waitid", "pidfd_open"})

#: ``avmm serve``'s one thread that makes IP sockets (avmm.isolation.ip_sockets): a
#: migration's TCP listener (socket, setsockopt, bind, listen, getsockname) or the
#: socket a source connects from, and the resolver for a host name in a ``tcp:`` address
#: (glibc's: /etc/nsswitch.conf, hosts and resolv.conf read; nscd tried over a unix
#: socket; DNS over UDP: connect, sendmmsg, poll, ioctl FIONREAD, recvfrom; uname). It
#: waits for work on a queue (futex) and sends nothing else.
IP_SOCKETS = PYTHON_RUNTIME | frozenset({
    "close", "setsockopt", "getsockopt", "bind", "listen", "getsockname", "getpeername",
    "connect", "sendto", "sendmmsg", "recvfrom", "poll", "ppoll",
    "openat", "read", "fstat", "newfstatat", "lseek", "uname",
})

ALLOWED: dict[ThreadKind, frozenset[str]] = {
    ThreadKind.VCPU: VCPU,
    ThreadKind.DEVICE_IO: DEVICE_IO,
    ThreadKind.EVENT_LOOP: EVENT_LOOP,
    ThreadKind.BACKEND: BACKEND,
    ThreadKind.DAEMON: DAEMON,
    ThreadKind.IP_SOCKETS: IP_SOCKETS,
}

#: Calls allowed only with some values of one argument, per kind:
#: name -> (argument index, allowed values).
CONDITIONAL: dict[ThreadKind, dict[str, tuple[int, frozenset[int]]]] = {
    ThreadKind.VCPU: {},
    # A disk's requests admitted by a daemon-wide rate-limit group whose buckets live in
    # shared memory (avmm.ratelimit._shared): its open-file-description lock, taken and
    # released without blocking (F_OFD_SETLK), on the memfd mapped when the VM was built.
    # No other fcntl command (the event loop, which admits a NIC's frames, has fcntl in
    # FILES).
    ThreadKind.DEVICE_IO: {"fcntl": (1, frozenset({fcntl.F_OFD_SETLK}))},
    ThreadKind.EVENT_LOOP: {},
    ThreadKind.BACKEND: {},
    ThreadKind.DAEMON: {},
    ThreadKind.IP_SOCKETS: {},
}

#: The sockets each kind may make, as (domain, type, protocol) with None for any value
#: (the type is compared without its SOCK_NONBLOCK/SOCK_CLOEXEC flags). Unix sockets
#: only (console, vhost-user, the API's socket): never AF_INET/AF_INET6/AF_PACKET/
#: AF_NETLINK; except on ``avmm serve``'s IP_SOCKETS thread, which may be asked for a
#: migration over TCP at any time (a loaded filter cannot be widened later, so the
#: thread is made before the event loop's filter): TCP streams and the resolver's UDP
#: datagrams, with the plain protocols only. Never SOCK_RAW or the legacy SOCK_PACKET
#: (raw IP, or link-level frames through AF_INET), never ICMP or SCTP, never AF_PACKET
#: or AF_NETLINK: no raw frames and no changes to the host's network.
_UNIX = frozenset({(socket.AF_UNIX, None, None)})
_IP = frozenset(
    (domain, kind, protocol)
    for domain in (socket.AF_INET, socket.AF_INET6)
    for kind, protocols in ((socket.SOCK_STREAM, (0, socket.IPPROTO_TCP)),
                            (socket.SOCK_DGRAM, (0, socket.IPPROTO_UDP)))
    for protocol in protocols)
SOCKETS: dict[ThreadKind, frozenset[tuple[int, int | None, int | None]]] = {
    ThreadKind.VCPU: frozenset(),
    ThreadKind.DEVICE_IO: frozenset(),
    ThreadKind.EVENT_LOOP: _UNIX,
    ThreadKind.BACKEND: _UNIX,
    ThreadKind.DAEMON: _UNIX,
    # AF_UNIX: the resolver asks nscd first, over a unix socket.
    ThreadKind.IP_SOCKETS: _UNIX | _IP,
}

#: Sockets a kind's filter refuses with EAFNOSUPPORT instead of its default action, by
#: domain. The resolver sorts a host name's addresses (``localhost`` is 127.0.0.1 and
#: ::1 on most hosts) with what a NETLINK_ROUTE socket tells it, and does without when
#: it cannot make one; a netlink socket of a root daemon could change the host's
#: routes, so the IP-socket thread is refused one, and goes on. Any filter that holds
#: this kind says so (the daemon's process filter too, or its answer would win: stacked
#: filters take the strictest); the event loop's own still kills.
SOCKETS_REFUSED: dict[ThreadKind, frozenset[int]] = {
    ThreadKind.IP_SOCKETS: frozenset({socket.AF_NETLINK}),
}

# -- ioctl requests (argument 1 checked) ---------------------------------------------------

#: A vCPU's own state, read and written by its thread when it fixes up an exit (#BP
#: injection, emulated instructions, MSR accesses) or parks for a snapshot, plus KVM_RUN
#: and KVM_IRQ_LINE (legacy devices emulated on the vCPU thread raise their interrupts).
_VCPU_IOCTLS = frozenset({
    "KVM_RUN", "KVM_IRQ_LINE",
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
    "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_MSRS", "KVM_SET_MSRS",
    "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
    "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_TRANSLATE",
    "KVM_GET_XSAVE", "KVM_GET_XSAVE2", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS",
    "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
})

#: Building and restoring a VM (the event loop's helper thread does it), its interrupt
#: and notification wiring, dirty logs: every KVM ioctl avmm declares (kvm/_ffi_build.py).
_KVM_IOCTLS = _VCPU_IOCTLS | frozenset({
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST",
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2",
    "KVM_IRQFD", "KVM_IOEVENTFD", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
    "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_GET_DIRTY_LOG",
    "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_TSC_KHZ", "KVM_SET_TSC_KHZ",
})

#: Not from <linux/kvm.h>: non-blocking sockets (FIONBIO, FIOCLEX), the terminal's mode
#: for ``avmm up`` (tcgetattr/tcsetattr; never TIOCSTI), and a tap's set-up and offloads
#: (TUNSETOFFLOAD also when the driver negotiates features, after the filter).
OTHER_IOCTLS: dict[str, int] = {
    "FIONBIO": termios.FIONBIO, "FIOCLEX": termios.FIOCLEX, "FIONCLEX": termios.FIONCLEX,
    "TCGETS": termios.TCGETS, "TCSETS": termios.TCSETS, "TCSETSW": termios.TCSETSW,
    "TCSETSF": termios.TCSETSF,
    "TUNSETIFF": TUNSETIFF, "TUNSETOFFLOAD": TUNSETOFFLOAD,
    "TUNSETVNETHDRSZ": TUNSETVNETHDRSZ,
    # The resolver's, on its DNS socket (IP_SOCKETS only).
    "FIONREAD": termios.FIONREAD,
}

#: What a VM's worker in ``avmm serve --isolation process`` refuses besides: the daemon
#: opens its taps and hands the fds over attached, so it never needs TUNSETIFF. (The
#: calls that would change an attached tap's life or ownership, TUNSETPERSIST,
#: TUNSETOWNER and TUNSETGROUP, are in no list at all: the kernel checks no capability
#: for them on an attached fd; see avmm.isolation.taps.)
WORKER_REFUSED_IOCTLS = frozenset({"TUNSETIFF"})

#: ioctl requests per kind, by name (``KVM_*`` numbers come from <linux/kvm.h> via cffi,
#: the others from OTHER_IOCTLS).
IOCTLS: dict[ThreadKind, frozenset[str]] = {
    ThreadKind.VCPU: _VCPU_IOCTLS,
    ThreadKind.DEVICE_IO: frozenset(),
    ThreadKind.EVENT_LOOP: _KVM_IOCTLS | frozenset(OTHER_IOCTLS) - {"FIONCLEX", "FIONREAD"},
    # FIONCLEX: hypercorn adopts the API's listening socket (fd://) after the filter,
    # and makes the adopted socket inheritable (for its own workers; avmm starts none,
    # and nothing under the filter may exec anyway).
    ThreadKind.DAEMON: _KVM_IOCTLS | frozenset(OTHER_IOCTLS) - {"FIONREAD"},
    ThreadKind.BACKEND: frozenset({"FIONBIO", "FIOCLEX", "TCGETS", "TUNSETOFFLOAD",
                                   "TUNSETVNETHDRSZ"}),
    ThreadKind.IP_SOCKETS: frozenset({"FIONREAD"}),
}
