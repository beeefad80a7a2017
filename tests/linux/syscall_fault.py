"""What ``/bin/avmm-syscall-fault`` (tests/linux/syscall-fault.c) reports, and what it must
report: a guest process that jumps to the kernel's ``entry_SYSCALL_64`` itself, with
RCX, R11 and RAX of its choosing, gains nothing.

The minimal kernel's patch (examples/linux/patches/0001-*.patch) runs a user-mode fault
at that address as a system call only with :data:`~avmm.cpu_profile.PVM_SYSCALL_FAULT_OPT_IN`
on the command line, only when RCX follows a real ``syscall`` instruction, and then
returns with IF set and IOPL, NT, TF, AC, DF clear. So, whatever the host:

* ``ordinary``: an ordinary ``syscall`` works (getpid's result is the child's pid);
* ``not-syscall`` (RCX after two ``nop``): never comes back; killed by SIGSEGV;
* ``genuine`` (RCX after a ``syscall``, R11 = IOPL 3, NT, AC, DF, IF clear): without the
  opt-in it never comes back (the patch does nothing); with it, it comes back from the
  getpid it asked for with the flags masked, and its ``outb`` is then refused (SIGSEGV).
  Coming back is also the proof that the program found the entry point: a wrong address
  would only ever give SIGSEGV.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
from pathlib import Path

from avmm.cpu_profile import PVM_SYSCALL_FAULT_OPT_IN

#: The command-line word that tells the guest where to jump (tests/linux/run/syscall-fault).
ENTRY_WORD = "avmm.syscall_entry"
CASES = ("ordinary", "genuine", "not-syscall")

# EFLAGS bits (Intel SDM vol. 1, 3.4.3).
TF, IF, DF, IOPL, NT, AC = 1 << 8, 1 << 9, 1 << 10, 3 << 12, 1 << 14, 1 << 18

_RETURNED = re.compile(r"avmm-linux: syscall-fault (\S+) returned ret=(\d+) flags=0x([0-9a-f]+)")
_OUTB = re.compile(r"avmm-linux: syscall-fault (\S+) outb succeeded")
_ENDED = re.compile(r"avmm-linux: syscall-fault (\S+) pid=(\d+) (exit|signal)=(\d+)")


def syscall_entry(vmlinux: Path) -> int:
    """``entry_SYSCALL_64``'s address in ``vmlinux``'s symbol table. The minimal kernel is
    not relocatable (no KASLR), so its bzImage runs the code at the same address."""
    result = subprocess.run(["nm", str(vmlinux)], check=True, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == "entry_SYSCALL_64":
            return int(fields[0], 16)
    raise AssertionError(f"no entry_SYSCALL_64 in {vmlinux}'s symbols")


def cmdline_words(vmlinux: Path, *, opt_in: bool) -> str:
    """The words that run the program against ``vmlinux`` (with or without the opt-in)."""
    words = f"{ENTRY_WORD}={syscall_entry(vmlinux):#x}"
    return f"{words} {PVM_SYSCALL_FAULT_OPT_IN}" if opt_in else words


@dataclasses.dataclass
class Outcome:
    pid: int | None = None
    exit_status: int | None = None
    signal: int | None = None
    #: (RAX, RFLAGS) when the child came back from its jump to the entry point.
    returned: tuple[int, int] | None = None
    outb_succeeded: bool = False


def parse(lines: list[str]) -> dict[str, Outcome]:
    """Each case's outcome from the guest's ``avmm-linux: syscall-fault`` lines."""
    outcomes: dict[str, Outcome] = {}
    for line in lines:
        if match := _RETURNED.fullmatch(line):
            outcomes.setdefault(match[1], Outcome()).returned = (int(match[2]),
                                                                  int(match[3], 16))
        elif match := _OUTB.fullmatch(line):
            outcomes.setdefault(match[1], Outcome()).outb_succeeded = True
        elif match := _ENDED.fullmatch(line):
            outcome = outcomes.setdefault(match[1], Outcome())
            outcome.pid = int(match[2])
            if match[3] == "exit":
                outcome.exit_status = int(match[4])
            else:
                outcome.signal = int(match[4])
    return outcomes


def check(lines: list[str], *, opted_in: bool) -> None:
    """Assert the outcomes above from the guest's lines (all of its ``avmm-linux:`` lines)."""
    report = [line for line in lines if line.startswith("avmm-linux: syscall-fault ")]
    assert not [line for line in report if "FAILED" in line], report
    outcomes = parse(report)
    assert set(outcomes) == set(CASES), report
    ordinary = outcomes["ordinary"]
    assert ordinary.pid is not None and ordinary.exit_status == ordinary.pid & 0x7F, report
    assert ordinary.returned is None, report
    killed = (signal.SIGSEGV, signal.SIGILL)
    for name in ("genuine", "not-syscall"):
        outcome = outcomes[name]
        assert not outcome.outb_succeeded, (name, report)
        assert outcome.signal in killed, (name, report)
    assert outcomes["not-syscall"].returned is None, report
    genuine = outcomes["genuine"]
    if not opted_in:
        assert genuine.returned is None, report
        return
    assert genuine.returned is not None, report
    ret, flags = genuine.returned
    assert ret == genuine.pid, report  # the getpid it asked for ran
    assert flags & IF, f"IF clear: {flags:#x}"
    assert not flags & (IOPL | NT | TF | AC | DF), f"privileged or control flags: {flags:#x}"
