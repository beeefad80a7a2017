"""Fallbacks for instructions that KVM's in-kernel emulator refuses.

On ordinary hardware KVM the guest's ring-0 code runs natively and this module never
acts. On nested or paravirtual KVM hosts (such as one where guest ring-0 code is
interpreted), KVM's instruction emulator gives up on a few instructions and reports
``KVM_EXIT_INTERNAL_ERROR`` with suberror ``KVM_INTERNAL_ERROR_EMULATION``. For the ones
listed here the architectural effect is simple enough to produce from userspace:

* ``int3`` (0xCC): inject #BP as the CPU would. #BP is a trap, so the saved RIP is the
  instruction after ``int3``: advance RIP by one, then inject vector 3. Linux's int3
  self-test and kprobes-style patching rely on this.

  Caveat: KVM treats an injected #BP as a software exception. On this kind of host the
  guest's handler sees the right return address (a test checks it); a host whose
  injection path adds the instruction length again would return one byte too far.
  Should that show up, deliver #BP entirely from userspace (push the interrupt frame,
  load CS:RIP from the IDT gate) instead.

* ``fwait`` (0x9B): waits for pending unmasked x87 exceptions. Linux issues it with all
  x87 exceptions masked (and the VMM never raises one), so its effect is nothing: advance
  RIP by one.
* ``clac``/``stac`` (0F 01 CA / 0F 01 CB): clear/set RFLAGS.AC, advance RIP by three.
  The CPU raises #UD for them without SMAP or outside ring 0; Linux executes them only
  after finding SMAP in CPUID and only in ring 0, and KVM reports the failure only for
  ring-0 code, so the effect is exactly the flag change.

Anything else is left alone and the VM stops with the instruction bytes in its reason
(see PEERS.md for instructions seen on such hosts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ..vcpu import Vcpu, events_exception

log = structlog.get_logger(__name__)

#: Longest x86 instruction.
MAX_INSTRUCTION_LENGTH = 15

BREAKPOINT_VECTOR = 3
INT3 = 0xCC
FWAIT = b"\x9b"
CLAC = b"\x0f\x01\xca"
STAC = b"\x0f\x01\xcb"
RFLAGS_AC = 1 << 18

GuestReader = Callable[[int, int], bytes | None]
"""Reads ``length`` bytes at a guest-physical address; None where not RAM."""


@dataclass(frozen=True)
class FaultingInstruction:
    """Where a vCPU stopped and the bytes found there (possibly fewer than 15)."""

    rip: int
    linear_address: int
    physical_address: int | None
    code: bytes

    def describe(self) -> str:
        where = f"rip=0x{self.rip:x}"
        if self.physical_address is None:
            return f"{where} (not mapped)"
        shown = " ".join(f"{b:02x}" for b in self.code) or "unreadable"
        return f"{where} gpa=0x{self.physical_address:x} bytes=[{shown}]"


def faulting_instruction(vcpu: Vcpu, read_guest: GuestReader) -> FaultingInstruction:
    """Fetch the instruction at the vCPU's RIP, following its page tables."""
    rip = vcpu.get_regs().rip
    sregs = vcpu.get_sregs()
    # In long mode CS.base is ignored (treated as 0); elsewhere it is added.
    long_mode = bool(sregs.efer & (1 << 10))
    linear = rip if long_mode else (sregs.cs.base + rip) & 0xFFFF_FFFF
    physical = _translate(vcpu, linear)
    code = b""
    if physical is not None:
        # Read up to the end of the page, then continue on the next page if mapped.
        first = min(MAX_INSTRUCTION_LENGTH, 4096 - (linear & 0xFFF))
        code = read_guest(physical, first) or b""
        if len(code) == first and first < MAX_INSTRUCTION_LENGTH:
            next_physical = _translate(vcpu, linear + first)
            if next_physical is not None:
                code += read_guest(next_physical, MAX_INSTRUCTION_LENGTH - first) or b""
    return FaultingInstruction(rip, linear, physical, code)


def try_emulate(vcpu: Vcpu, instruction: FaultingInstruction) -> bool:
    """Perform the instruction's effect if it is one we know; True if the vCPU may go on."""
    if instruction.code[:1] == bytes([INT3]):
        _inject_breakpoint(vcpu)
        log.debug("emulated int3", vcpu=vcpu.id, rip=hex(instruction.rip))
        return True
    code = instruction.code
    if code.startswith(FWAIT):
        _advance(vcpu, len(FWAIT))
    elif code.startswith(CLAC):
        _advance(vcpu, len(CLAC), clear_flags=RFLAGS_AC)
    elif code.startswith(STAC):
        _advance(vcpu, len(STAC), set_flags=RFLAGS_AC)
    else:
        return False
    log.debug("emulated instruction", vcpu=vcpu.id, rip=hex(instruction.rip),
              code=code[:3].hex())
    return True


def _advance(vcpu: Vcpu, length: int, *, set_flags: int = 0, clear_flags: int = 0) -> None:
    regs = vcpu.get_regs()
    regs.rip += length
    regs.rflags = (regs.rflags | set_flags) & ~clear_flags
    vcpu.set_regs(regs)


def _inject_breakpoint(vcpu: Vcpu) -> None:
    regs = vcpu.get_regs()
    regs.rip += 1
    vcpu.set_regs(regs)
    events = vcpu.get_vcpu_events()
    exception = events_exception(events)
    exception.injected = 1
    exception.nr = BREAKPOINT_VECTOR
    exception.has_error_code = 0
    exception.error_code = 0
    exception.pending = 0
    # Only the exception is being changed: don't ask KVM to apply NMI/SIPI/shadow state.
    events.flags = 0
    vcpu.set_vcpu_events(events)


def _translate(vcpu: Vcpu, linear: int) -> int | None:
    try:
        return vcpu.translate(linear)
    except Exception:  # a host without KVM_TRANSLATE: report what we can
        return None
