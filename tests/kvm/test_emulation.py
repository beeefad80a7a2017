"""The userspace fallbacks for instructions KVM's emulator refuses (ring-0 ``int3``).

On ordinary hardware KVM ``int3`` runs natively and the fallback never acts; on a host
that interprets guest ring-0 code, KVM reports an emulation failure and
:func:`~avmm.kvm.x86.emulation.try_emulate` injects #BP. Either way the test checks the
architectural outcome: the #BP handler runs with the address after ``int3`` as the saved
RIP, and ``iretq`` continues after the ``int3``.
"""

from __future__ import annotations

from typing import cast

import pytest

from avmm.arch.x86.gdt import BOOT_CODE_SELECTOR
from avmm.arch.x86.layout import BOOT_STACK_TOP
from avmm.kvm import Vcpu, exits
from avmm.kvm.vcpu import events_exception
from avmm.kvm.x86.emulation import (
    MAX_INSTRUCTION_LENGTH,
    FaultingInstruction,
    faulting_instruction,
    try_emulate,
)

from .guest import (
    CODE_ADDRESS,
    HANDLER_ADDRESS,
    UNMAPPED_MMIO_ADDRESS,
    install_idt,
    read_guest,
    run,
    run_emulating,
)

UD2 = b"\x0f\x0b"
BREAKPOINT_VECTOR = 3
#: Bytes of an interrupt frame without error code: RIP, CS, RFLAGS, RSP, SS.
INTERRUPT_FRAME_SIZE = 40

# int3 ; out 0x45, al ; ud2
MAIN = b"\xcc" + bytes.fromhex("e645") + UD2
# mov rax, [rsp] ; out 0x44, eax ; iretq      (reports the saved RIP)
BREAKPOINT_HANDLER = bytes.fromhex("488b0424 e744 48cf")


@pytest.mark.kvm
def test_int3_runs_the_breakpoint_handler_and_continues(make_guest):
    guest = make_guest(MAIN, extra={HANDLER_ADDRESS: BREAKPOINT_HANDLER})
    install_idt(guest, {BREAKPOINT_VECTOR: HANDLER_ADDRESS})
    vcpu, memory = guest.vcpu, guest.memory

    # #BP is a trap: the saved RIP is the instruction after the one-byte int3
    after_int3 = CODE_ADDRESS + 1
    assert run_emulating(guest) == exits.IoOut(0x44, 4, 1, after_int3.to_bytes(4, "little"))
    regs = vcpu.get_regs()
    assert regs.rip == HANDLER_ADDRESS + 6  # after the handler's `out`
    frame = regs.rsp
    assert frame == BOOT_STACK_TOP - INTERRUPT_FRAME_SIZE
    assert memory.read_u64(frame) == after_int3
    assert memory.read_u64(frame + 8) == BOOT_CODE_SELECTOR
    assert memory.read_u64(frame + 24) == BOOT_STACK_TOP

    # iretq returned to the instruction after int3
    assert run_emulating(guest) == exits.IoOut(0x45, 1, 1, bytes([after_int3 & 0xFF]))
    regs = vcpu.get_regs()
    assert regs.rip == CODE_ADDRESS + 3
    assert regs.rsp == BOOT_STACK_TOP
    assert run_emulating(guest) == exits.Shutdown()


@pytest.mark.kvm
def test_faulting_instruction_reads_the_code_at_rip(make_guest):
    code = bytes(range(0x90, 0x90 + 20))
    _, vcpu, memory = make_guest(code)
    instruction = faulting_instruction(vcpu, read_guest(memory))
    assert instruction == FaultingInstruction(
        rip=CODE_ADDRESS, linear_address=CODE_ADDRESS, physical_address=CODE_ADDRESS,
        code=code[:MAX_INSTRUCTION_LENGTH],
    )


@pytest.mark.kvm
def test_faulting_instruction_continues_on_the_next_page(make_guest):
    start = HANDLER_ADDRESS - 6
    code = bytes(range(1, 1 + MAX_INSTRUCTION_LENGTH))
    _, vcpu, memory = make_guest(UD2, extra={start: code})
    regs = vcpu.get_regs()
    regs.rip = start
    vcpu.set_regs(regs)
    assert faulting_instruction(vcpu, read_guest(memory)).code == code


@pytest.mark.kvm
def test_faulting_instruction_where_nothing_is_mapped(make_guest):
    _, vcpu, memory = make_guest(UD2)
    regs = vcpu.get_regs()
    regs.rip = 0x2_0000_0000  # past the boot identity map
    vcpu.set_regs(regs)
    instruction = faulting_instruction(vcpu, read_guest(memory))
    assert instruction.physical_address is None
    assert instruction.code == b""
    assert instruction.describe() == "rip=0x200000000 (not mapped)"

    regs.rip = UNMAPPED_MMIO_ADDRESS  # mapped by the page tables, but not RAM
    vcpu.set_regs(regs)
    instruction = faulting_instruction(vcpu, read_guest(memory))
    assert instruction.physical_address == UNMAPPED_MMIO_ADDRESS
    assert instruction.describe() == "rip=0xd0000000 gpa=0xd0000000 bytes=[unreadable]"


def test_describe_names_rip_and_bytes():
    instruction = FaultingInstruction(
        rip=0xFFFF_FFFF_8100_0010, linear_address=0xFFFF_FFFF_8100_0010,
        physical_address=0x100_0010, code=b"\x0f\x0b\x90",
    )
    text = instruction.describe()
    assert "rip=0xffffffff81000010" in text
    assert "gpa=0x1000010" in text
    assert "bytes=[0f 0b 90]" in text


def test_unknown_instruction_is_not_emulated():
    # try_emulate must not touch a vCPU for an instruction it does not know
    untouchable = cast(Vcpu, object())
    for code in (UD2, b"", b"\xcd\x03"):  # ud2, nothing, `int 3` (not int3)
        instruction = FaultingInstruction(CODE_ADDRESS, CODE_ADDRESS, CODE_ADDRESS, code)
        assert try_emulate(untouchable, instruction) is False


@pytest.mark.kvm
def test_unknown_instruction_leaves_the_vcpu_alone(make_guest):
    _, vcpu, memory = make_guest(UD2)
    instruction = faulting_instruction(vcpu, read_guest(memory))
    assert instruction.code[:2] == UD2
    assert try_emulate(vcpu, instruction) is False
    assert vcpu.get_regs().rip == CODE_ADDRESS
    assert events_exception(vcpu.get_vcpu_events()).injected == 0
    assert run(vcpu) == exits.Shutdown()


# fwait ; stac ; pushfq ; pop rax ; out 0x44, eax ; clac ; pushfq ; pop rax ;
# out 0x44, eax ; ud2
FLAGS_PROGRAM = (b"\x9b" + b"\x0f\x01\xcb" + bytes.fromhex("9c 58 e744") + b"\x0f\x01\xca"
                 + bytes.fromhex("9c 58 e744") + UD2)
RFLAGS_AC = 1 << 18


@pytest.mark.kvm
def test_fwait_stac_clac_have_their_architectural_effect(make_guest):
    """Natively on hardware KVM with SMAP; through the fallback where KVM's emulator
    refuses them. Either way: fwait does nothing, stac sets RFLAGS.AC, clac clears it."""
    guest = make_guest(FLAGS_PROGRAM)
    after_stac = run_emulating(guest)
    assert isinstance(after_stac, exits.IoOut) and after_stac.port == 0x44
    assert int.from_bytes(after_stac.data, "little") & RFLAGS_AC
    after_clac = run_emulating(guest)
    assert isinstance(after_clac, exits.IoOut) and after_clac.port == 0x44
    assert not int.from_bytes(after_clac.data, "little") & RFLAGS_AC
    assert guest.vcpu.get_regs().rip == CODE_ADDRESS + len(FLAGS_PROGRAM) - len(UD2)


class _FakeRegs:
    def __init__(self, rip: int, rflags: int) -> None:
        self.rip, self.rflags = rip, rflags


class _FakeVcpu:
    id = 0

    def __init__(self, rflags: int) -> None:
        self.regs = _FakeRegs(CODE_ADDRESS, rflags)

    def get_regs(self) -> _FakeRegs:
        return self.regs

    def set_regs(self, regs: _FakeRegs) -> None:
        self.regs = regs


@pytest.mark.parametrize(
    ("code", "rflags_before", "length", "rflags_after"),
    [
        (b"\x9b\x90", 0x2, 1, 0x2),  # fwait
        (b"\x0f\x01\xcb", 0x2, 3, 0x2 | RFLAGS_AC),  # stac
        (b"\x0f\x01\xca", 0x2 | RFLAGS_AC, 3, 0x2),  # clac
    ],
)
def test_fallbacks_advance_rip_and_change_only_ac(code, rflags_before, length, rflags_after):
    vcpu = _FakeVcpu(rflags_before)
    instruction = FaultingInstruction(CODE_ADDRESS, CODE_ADDRESS, CODE_ADDRESS, code)
    assert try_emulate(cast(Vcpu, vcpu), instruction) is True
    assert vcpu.regs.rip == CODE_ADDRESS + length
    assert vcpu.regs.rflags == rflags_after
