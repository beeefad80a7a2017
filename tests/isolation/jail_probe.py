"""A process that jails itself (avmm.isolation.jail) and reports what it sees.

    python -m tests.isolation.jail_probe SPEC_JSON FD MODE [ARG...]

SPEC_JSON is a JailSpec's to_dict() as JSON; FD is a socket kept open through the jail
(the worker's channel stands in for it): the probe writes one JSON line to it with what
it found, and waits for a byte on it before it exits. Modes:

- ``inspect SECRET RO_FILE RW_DIR SOCKET``: enter the jail, drop privileges, report
  facts; then, for each ``c`` read, connect to SOCKET again and report.
- ``exit CODE``: enter the jail, report ``{}``, exit with CODE.
- ``wait``: enter the jail, drop privileges, report ``{}``, wait (to be killed).
- ``sigsys``: enter, drop, load a filter that kills the process on getppid(), call it.
- ``vm``: enter, drop, load the dense process's seccomp filter (kill mode), boot the
  test guest's hello scenario, report its serial output.

Everything it uses is imported before the jail is entered, as the worker will do;
what avmm imports lazily later must come from the jail's runtime binds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import stat
import sys

import pyseccomp  # its import runs ldconfig: not possible inside the jail
import trio

from avmm.config import VmConfig
from avmm.isolation import SeccompMode, install_process_filter
from avmm.isolation.jail import (
    JailError,
    JailSpec,
    drop_privileges,
    enter_jail,
    narrow_capabilities,
)
from avmm.isolation.seccomp import DENSE_PROCESS_KINDS
from avmm.vm import VirtualMachine
from tests.vm.helpers import guest_config

_libc = ctypes.CDLL(None, use_errno=True)
_PR_GET_DUMPABLE = 3
_KVM_GET_API_VERSION = 0xAE00


def _errno_of(action: object) -> str:
    try:
        action()  # type: ignore[operator]
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def _status() -> dict[str, str]:
    with open("/proc/self/status") as status:
        return dict(line.split(":\t", 1) for line in status.read().splitlines()
                    if ":\t" in line)


def _raise_errno(result: int) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _open_fds() -> list[int]:
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    open_fds = []
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue  # the directory listdir had open
        open_fds.append(fd)
    return sorted(open_fds)


def _kvm_version() -> int:
    import fcntl

    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
    finally:
        os.close(fd)


def _write_text(path: str) -> None:
    with open(path, "w") as f:
        f.write("written in the jail\n")


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)


def inspect(kept: int, secret: str, ro_file: str, rw_dir: str, backend: str
            ) -> dict[str, object]:
    with open(ro_file) as f:
        ro_text = f.read()
    status = _status()
    return {
        "pid": os.getpid(),
        "resuid": os.getresuid(),
        "resgid": os.getresgid(),
        "groups": os.getgroups(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "cap_eff": status["CapEff"].strip(),
        "dumpable": _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0),
        "root_entries": sorted(os.listdir("/")),
        "dev_entries": sorted(os.listdir("/dev")),
        "proc_pids": sorted(int(name) for name in os.listdir("/proc") if name.isdigit()),
        "secret": _errno_of(lambda: open(secret).close()),
        "ro_text": ro_text,
        "ro_write": _errno_of(lambda: open(ro_file, "a").close()),
        "rw_write": _errno_of(lambda: _write_text(os.path.join(rw_dir, "out.txt"))),
        "root_write": _errno_of(lambda: _write_text("/new-file")),
        "tmp_write": _errno_of(lambda: _write_text("/tmp/scratch")),
        "kvm_api": _kvm_version(),
        "connect": _errno_of(lambda: _connect(backend)),
        "fds": _open_fds(),
        "kept": kept,
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
    }


async def _hello(config: VmConfig) -> dict[str, object]:
    # The filter avmm up loads (kill mode): what the worker will do after dropping.
    install_process_filter(DENSE_PROCESS_KINDS, SeccompMode.KILL)
    output = bytearray()
    async with VirtualMachine(config) as vm:
        with trio.fail_after(60):
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
    return {"serial": output.decode(errors="replace"), "reason": result.reason.name}


def main() -> None:
    spec = JailSpec.from_dict(json.loads(sys.argv[1]))
    channel = socket.socket(fileno=int(sys.argv[2]))
    mode, args = sys.argv[3], sys.argv[4:]
    config = guest_config("avmm.test=hello") if mode == "vm" else None

    if mode == "swapped":
        # The daemon opened args[0]; then a client moved it away and put a symlink to
        # args[1] in its place. The jail binds what the daemon opened.
        fd = os.open(args[0], os.O_PATH)
        os.rename(args[0], args[0] + ".moved")
        os.symlink(args[1], args[0])
        try:
            enter_jail(spec, keep_fds=[channel.fileno()], bind_fds={args[0]: fd})
        except JailError as e:
            report = {"error": str(e)}
        else:
            with open(args[0], "rb") as bound:
                report = {"error": None, "content": bound.read().decode()}
        channel.sendall(json.dumps(report).encode() + b"\n")
        channel.recv(1)
        return
    enter_jail(spec, keep_fds=[channel.fileno()])
    report: dict[str, object] = {}
    if mode == "exit":
        channel.sendall(b"{}\n")
        os._exit(int(args[0]))
    if mode == "narrow":
        narrow_capabilities()
        status = _status()
        report = {
            "CapEff": status["CapEff"].strip(), "CapBnd": status["CapBnd"].strip(),
            "CapInh": status["CapInh"].strip(),
            "mount": _errno_of(lambda: _raise_errno(_libc.mount(
                b"none", b"/tmp", b"tmpfs", 0, None))),
            "mknod": _errno_of(lambda: os.mknod("/tmp/sda", 0o600 | stat.S_IFBLK,
                                                os.makedev(8, 0))),
            "kvm": _errno_of(lambda: os.close(os.open("/dev/kvm", os.O_RDWR))),
        }
        channel.sendall(json.dumps(report).encode() + b"\n")
        channel.recv(1)
        return
    drop_privileges(spec)
    if mode == "inspect":
        report = inspect(channel.fileno(), *args)
    elif mode == "sigsys":
        syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        syscall_filter.add_rule(pyseccomp.KILL_PROCESS, "getppid")
        syscall_filter.load()
        channel.sendall(b"{}\n")
        os.getppid()
        raise SystemExit("getppid() returned under a filter that kills on it")
    elif mode == "vm":
        assert config is not None
        report = trio.run(_hello, config)
    channel.sendall(json.dumps(report).encode() + b"\n")
    # "c": connect to the back-end socket again (it was made anew); anything else: exit.
    while mode == "inspect" and channel.recv(1) == b"c":
        channel.sendall(json.dumps({"connect": _errno_of(lambda: _connect(args[-1]))})
                        .encode() + b"\n")
    if mode != "inspect":
        channel.recv(1)


if __name__ == "__main__":
    main()
