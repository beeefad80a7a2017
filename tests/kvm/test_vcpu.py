"""The vCPU fd: register state round trips, and ``run()`` decoding each kind of exit.

Each guest program is a few hand-assembled 64-bit instructions (the assembly is in the
comment next to the bytes) that start at CODE_ADDRESS in the boot state of
:mod:`tests.kvm.guest`. Programs end in ``ud2``: with the boot IDT empty that is a triple
fault, so a test that runs one exit too far sees ``Shutdown`` instead of hanging.
"""

from __future__ import annotations

import threading
import time

import pytest

from avmm.arch.x86.boot_cpu import BOOT_CR0, BOOT_EFER
from avmm.arch.x86.gdt import BOOT_CODE_SELECTOR
from avmm.errors import KvmError
from avmm.kvm import exits, install_kick_handler
from avmm.kvm.vcpu import events_exception
from avmm.x86_vcpu import FPU_CONTROL_WORD, MSR_KERNEL_GS_BASE, MSR_LSTAR

from .guest import CODE_ADDRESS, DATA_ADDRESS, UNMAPPED_MMIO_ADDRESS, run

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"
#: jmp $ (a tight ring-0 loop that never exits by itself)
SPIN = b"\xeb\xfe"

APIC_TPR = 0x80
# struct kvm_mp_state values (Documentation/virt/kvm/api.rst)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3
INVALID_OPCODE_VECTOR = 6


def _kvm_parameter(name: str) -> str | None:
    try:
        with open(f"/sys/module/kvm/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


# -- register state ----------------------------------------------------------------------


def test_regs_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    regs = vcpu.get_regs()
    assert regs.rip == CODE_ADDRESS
    regs.rax = 0x0123_4567_89AB_CDEF
    regs.r15 = 0xFEDC_BA98_7654_3210
    regs.rip = CODE_ADDRESS + 0x10
    regs.rflags = 0x202
    vcpu.set_regs(regs)

    again = vcpu.get_regs()
    assert again is not regs
    assert (again.rax, again.r15, again.rip, again.rflags) == (
        0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210, CODE_ADDRESS + 0x10, 0x202)


def test_sregs_reflect_boot_state_and_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    sregs = vcpu.get_sregs()
    assert sregs.cs.selector == BOOT_CODE_SELECTOR
    assert sregs.cs.l == 1
    assert sregs.cr0 & BOOT_CR0 == BOOT_CR0
    assert sregs.efer & BOOT_EFER == BOOT_EFER

    sregs.cr2 = 0xDEAD_B000
    sregs.gdt.limit = 0x2F
    vcpu.set_sregs(sregs)
    again = vcpu.get_sregs()
    assert again.cr2 == 0xDEAD_B000
    assert again.gdt.limit == 0x2F


def test_fpu_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    fpu = vcpu.get_fpu()
    # configure_platform_state's control word, read back through KVM. (Not its MXCSR:
    # KVM_GET_FPU and KVM_SET_FPU leave MXCSR out; it is only reachable through XSAVE.)
    assert fpu.fcw == FPU_CONTROL_WORD
    pattern = bytes(range(16))
    for i, byte in enumerate(pattern):
        fpu.xmm[3][i] = byte
    fpu.fcw = 0x27F  # 53-bit precision
    vcpu.set_fpu(fpu)

    again = vcpu.get_fpu()
    assert bytes(again.xmm[3]) == pattern
    assert again.fcw == 0x27F


def test_msrs_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    values = {MSR_KERNEL_GS_BASE: 0xFFFF_8880_1234_5000, MSR_LSTAR: 0xFFFF_FFFF_8100_0000}
    vcpu.set_msrs(values)
    assert vcpu.get_msrs(values) == values


def test_get_msrs_names_an_msr_kvm_does_not_have(make_guest):
    _, vcpu, _ = make_guest(UD2)
    if _kvm_parameter("ignore_msrs") == "Y":
        # This host's KVM is told to read unknown MSRs as 0 rather than refuse them.
        assert vcpu.get_msrs([0x4B56_0FFF]) == {0x4B56_0FFF: 0}
        return
    with pytest.raises(KvmError) as caught:
        vcpu.get_msrs([MSR_LSTAR, 0x4B56_0FFF])
    assert caught.value.ioctl == "KVM_GET_MSRS"
    assert "0x4b560fff" in str(caught.value)


def test_lapic_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    lapic = vcpu.get_lapic()
    assert len(lapic) == 1024
    lapic[APIC_TPR:APIC_TPR + 4] = (0x20).to_bytes(4, "little")
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic()[APIC_TPR:APIC_TPR + 4] == (0x20).to_bytes(4, "little")


def test_set_lapic_rejects_wrong_size(make_guest):
    _, vcpu, _ = make_guest(UD2)
    with pytest.raises(ValueError, match="1024 bytes"):
        vcpu.set_lapic(bytes(16))


def test_vcpu_events_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    events = vcpu.get_vcpu_events()
    assert events_exception(events).injected == 0

    # A hardware exception: KVM_GET_VCPU_EVENTS never reports an injected software
    # exception (#BP, #OF), whose instruction length the API cannot carry.
    exception = events_exception(events)
    exception.injected = 1
    exception.nr = INVALID_OPCODE_VECTOR
    events.flags = 0  # only the exception: leave NMI, SIPI and shadow state alone
    vcpu.set_vcpu_events(events)

    again = vcpu.get_vcpu_events()
    assert (events_exception(again).injected, events_exception(again).nr) == (
        1, INVALID_OPCODE_VECTOR)


def test_mp_state_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    assert vcpu.get_mp_state() == KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == KVM_MP_STATE_HALTED
    vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
    assert vcpu.get_mp_state() == KVM_MP_STATE_RUNNABLE


def test_set_cpuid2_is_what_the_guest_sees(make_guest):
    # xor eax, eax ; cpuid ; mov eax, ebx ; out 0x42, eax ; ud2
    code = bytes.fromhex("31c0 0fa2 89d8 e742") + UD2
    vm, vcpu, _ = make_guest(code)
    leaf0 = next(e for e in vm.kvm.supported_cpuid() if e.function == 0)
    assert run(vcpu) == exits.IoOut(0x42, 4, 1, leaf0.ebx.to_bytes(4, "little"))


def test_translate_follows_the_boot_identity_map(make_guest):
    _, vcpu, _ = make_guest(UD2)
    assert vcpu.translate(CODE_ADDRESS + 0x123) == CODE_ADDRESS + 0x123
    assert vcpu.translate(UNMAPPED_MMIO_ADDRESS + 0x8) == UNMAPPED_MMIO_ADDRESS + 0x8
    # the boot page tables end at 4 GiB
    assert vcpu.translate(0x2_0000_0000) is None


# -- port I/O ------------------------------------------------------------------------------


def test_out_byte(make_guest):
    # mov al, 0x5a ; out 0x42, al ; ud2
    _, vcpu, _ = make_guest(bytes.fromhex("b05a e642") + UD2)
    assert run(vcpu) == exits.IoOut(port=0x42, size=1, count=1, data=b"\x5a")
    assert run(vcpu) == exits.Shutdown()


def test_in_byte_reaches_the_guest(make_guest):
    # in al, 0x43 ; out 0x42, al ; ud2
    _, vcpu, _ = make_guest(bytes.fromhex("e443 e642") + UD2)
    event = run(vcpu)
    assert isinstance(event, exits.IoIn)
    assert (event.port, event.size, event.count, len(event.buffer)) == (0x43, 1, 1, 1)
    event.buffer[:] = b"\xa7"

    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\xa7")
    assert vcpu.get_regs().rax & 0xFF == 0xA7


OUT_DX = {1: b"\xee", 2: b"\x66\xef", 4: b"\xef"}  # out dx, al / ax / eax
IN_DX = {1: b"\xec", 2: b"\x66\xed", 4: b"\xed"}  # in al / ax / eax, dx


@pytest.mark.parametrize("size", [1, 2, 4])
def test_port_io_sizes(make_guest, size):
    # mov dx, 0x510 ; mov eax, 0x44332211 ; out dx, eAX ; in eAX, dx ; out dx, eAX ; ud2
    code = bytes.fromhex("66ba1005 b811223344") + OUT_DX[size] + IN_DX[size] + OUT_DX[size]
    _, vcpu, _ = make_guest(code + UD2)

    assert run(vcpu) == exits.IoOut(0x510, size, 1, b"\x11\x22\x33\x44"[:size])
    event = run(vcpu)
    assert isinstance(event, exits.IoIn)
    assert (event.port, event.size, event.count, len(event.buffer)) == (0x510, size, 1, size)
    event.buffer[:] = b"\xa1\xb2\xc3\xd4"[:size]
    assert run(vcpu) == exits.IoOut(0x510, size, 1, b"\xa1\xb2\xc3\xd4"[:size])


def test_rep_outsb(make_guest):
    # mov esi, DATA ; mov ecx, 5 ; mov dx, 0x42 ; rep outsb ; out 0x43, al ; ud2
    code = bytes.fromhex("be00201000 b905000000 66ba4200 f36e e643") + UD2
    _, vcpu, _ = make_guest(code, extra={DATA_ADDRESS: b"hello"})
    sent = b""
    # KVM may split string I/O over several exits (x86 KVM sends OUTS one element per
    # exit); each exit's data must hold size * count bytes.
    while isinstance(event := run(vcpu), exits.IoOut) and event.port == 0x42:
        assert event.size == 1
        assert len(event.data) == event.size * event.count
        sent += event.data
    assert sent == b"hello"
    assert isinstance(event, exits.IoOut)
    assert event.port == 0x43
    assert vcpu.get_regs().rcx == 0


def test_rep_insb(make_guest):
    # mov edi, DATA ; mov ecx, 5 ; mov dx, 0x42 ; rep insb ; out 0x43, al ; ud2
    code = bytes.fromhex("bf00201000 b905000000 66ba4200 f36c e643") + UD2
    _, vcpu, memory = make_guest(code)
    source = b"world"
    counts = []
    while isinstance(event := run(vcpu), exits.IoIn):
        assert (event.port, event.size, len(event.buffer)) == (0x42, 1, event.count)
        event.buffer[:] = source[:event.count]
        source = source[event.count:]
        counts.append(event.count)
    assert isinstance(event, exits.IoOut)
    assert event.port == 0x43
    assert sum(counts) == 5
    assert memory.read(DATA_ADDRESS, 5) == b"world"


# -- MMIO ----------------------------------------------------------------------------------


def test_mmio_writes(make_guest):
    # mov ebx, 0xd0000000 ; mov eax, 0x11223344 ; mov [rbx], eax
    # movabs rax, 0x5566778899aabbcc ; mov [rbx+8], rax ; ud2
    code = bytes.fromhex("bb000000d0 b844332211 8903 48b8ccbbaa9988776655 48894308") + UD2
    _, vcpu, _ = make_guest(code)
    assert run(vcpu) == exits.MmioWrite(UNMAPPED_MMIO_ADDRESS, b"\x44\x33\x22\x11")
    assert run(vcpu) == exits.MmioWrite(
        UNMAPPED_MMIO_ADDRESS + 8, bytes.fromhex("ccbbaa9988776655"))
    assert run(vcpu) == exits.Shutdown()


def test_mmio_reads_reach_the_guest(make_guest):
    # mov ebx, 0xd0000000 ; mov eax, [rbx] ; out 0x42, eax
    # mov rax, [rbx+8] ; out 0x43, al ; ud2
    code = bytes.fromhex("bb000000d0 8b03 e742 488b4308 e643") + UD2
    _, vcpu, _ = make_guest(code)

    event = run(vcpu)
    assert isinstance(event, exits.MmioRead)
    assert (event.address, len(event.buffer)) == (UNMAPPED_MMIO_ADDRESS, 4)
    event.buffer[:] = b"\x78\x56\x34\x12"
    assert run(vcpu) == exits.IoOut(0x42, 4, 1, b"\x78\x56\x34\x12")

    event = run(vcpu)
    assert isinstance(event, exits.MmioRead)
    assert (event.address, len(event.buffer)) == (UNMAPPED_MMIO_ADDRESS + 8, 8)
    event.buffer[:] = (0x0102_0304_0506_0708).to_bytes(8, "little")
    assert run(vcpu) == exits.IoOut(0x43, 1, 1, b"\x08")
    assert vcpu.get_regs().rax == 0x0102_0304_0506_0708


# -- ending and interrupting a run ---------------------------------------------------------


def test_triple_fault_is_shutdown(make_guest):
    # ud2 with an empty IDT: #UD cannot be delivered -> #GP -> #DF -> triple fault
    _, vcpu, _ = make_guest(UD2)
    assert vcpu.get_sregs().idt.limit == 0
    assert run(vcpu) == exits.Shutdown()


def test_immediate_exit(make_guest):
    # mov al, 0x5a ; out 0x42, al ; ud2
    _, vcpu, _ = make_guest(bytes.fromhex("b05a e642") + UD2)
    vcpu.set_immediate_exit(True)
    assert vcpu.run() == exits.Interrupted()
    assert vcpu.run() == exits.Interrupted()  # it stays set until cleared
    assert vcpu.get_regs().rip == CODE_ADDRESS
    vcpu.set_immediate_exit(False)
    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\x5a")


def test_kicking_a_closed_vcpu_does_nothing(make_guest):
    # A stop can be requested while a failed incoming migration releases its vCPUs.
    _, vcpu, _ = make_guest(UD2)
    vcpu.close()
    vcpu.kick()
    assert vcpu.fd == -1


def test_kick_interrupts_a_spinning_vcpu(make_guest):
    install_kick_handler()
    _, vcpu, _ = make_guest(SPIN)
    results: list[exits.VcpuExit | BaseException] = []
    entered = threading.Event()

    def body() -> None:
        vcpu.thread_ident = threading.get_ident()
        entered.set()
        try:
            results.append(vcpu.run())
        except BaseException as e:
            results.append(e)

    thread = threading.Thread(target=body, daemon=True, name="vcpu")
    thread.start()
    assert entered.wait(5)
    time.sleep(0.05)  # let it get into KVM_RUN (a kick before that must work as well)
    started = time.monotonic()
    vcpu.kick()
    thread.join(5)
    assert not thread.is_alive(), "the vCPU thread was not kicked out of KVM_RUN"
    assert results == [exits.Interrupted()]
    assert time.monotonic() - started < 5
    # the guest was really running the loop, and can run on once immediate_exit is cleared
    assert vcpu.get_regs().rip == CODE_ADDRESS
    vcpu.set_immediate_exit(False)
