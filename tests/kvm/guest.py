"""A bare long-mode guest for the KVM binding tests, and helpers to drive it.

The guest is the 64-bit boot protocol's entry state (flat segments, the boot identity map
of the first 4 GiB, interrupts off, the boot IDT empty) with a few bytes of hand-assembled
machine code at :data:`CODE_ADDRESS`. Tests read the exits it produces one by one.

Guest ring-0 code may be interpreted on paravirtual KVM hosts (about 1 µs/instruction,
10 µs per exit to userspace): keep guest loops short.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import NamedTuple

from avmm.arch.x86 import layout
from avmm.arch.x86.boot_cpu import boot_cpu_state
from avmm.arch.x86.cpuid import filter_cpuid
from avmm.arch.x86.gdt import BOOT_CODE_SELECTOR, boot_gdt
from avmm.arch.x86.pagetables import write_identity_map
from avmm.errors import GuestAddressError
from avmm.kvm import Kvm, Vcpu, Vm, exits, install_kick_handler
from avmm.kvm.x86 import emulation
from avmm.memory import MIB, GuestMemory
from avmm.x86_vcpu import apply_boot_state, configure_platform_state

#: Where the guest's code is loaded and where the vCPU starts.
CODE_ADDRESS = layout.KERNEL_LOAD_ADDRESS
#: A page for interrupt handlers, apart from the main code.
HANDLER_ADDRESS = CODE_ADDRESS + 0x1000
#: A page for data the code works on.
DATA_ADDRESS = CODE_ADDRESS + 0x2000
#: Guest-physical address in the MMIO hole, identity-mapped by the boot page tables, where
#: nothing is mapped: accesses there exit to userspace as MMIO.
UNMAPPED_MMIO_ADDRESS = 0xD000_0000
#: How long any single ``run()`` may take before the watchdog kicks the vCPU out.
RUN_TIMEOUT_S = 5.0

INTERRUPT_GATE_64 = 0x8E  # present, DPL 0, 64-bit interrupt gate


class Guest(NamedTuple):
    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory


def boot_guest(
    cleanup: ExitStack,
    code: bytes,
    *,
    memory_mib: int = 2,
    extra: Mapping[int, bytes] | None = None,
) -> Guest:
    """A VM of ``memory_mib`` MiB with the in-kernel irqchip, in the 64-bit boot state with
    ``code`` at CODE_ADDRESS (and each of ``extra``'s byte strings at its address);
    everything is closed by ``cleanup`` (vCPU, VM, /dev/kvm, then memory)."""
    memory = GuestMemory(memory_mib * MIB)
    cleanup.callback(memory.close)
    kvm = Kvm()
    cleanup.callback(kvm.close)
    vm = kvm.create_vm()
    cleanup.callback(vm.close)
    vm.set_tss_address(layout.KVM_TSS_ADDRESS)
    vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
    vm.create_irqchip()
    for slot, region in enumerate(memory.regions):
        vm.set_user_memory_region(slot, region.guest_address, region.size,
                                  memory.host_address(region))

    gdt = boot_gdt()
    memory.write(layout.BOOT_GDT_ADDRESS, gdt)
    cr3 = write_identity_map(memory)
    memory.write(CODE_ADDRESS, code)
    for address, data in (extra or {}).items():
        memory.write(address, data)

    vcpu = vm.create_vcpu(0)
    cleanup.callback(vcpu.close)
    vcpu.set_cpuid2(filter_cpuid(kvm.supported_cpuid(), vcpu_id=0, vcpu_count=1))
    configure_platform_state(vcpu)
    apply_boot_state(vcpu, boot_cpu_state(entry=CODE_ADDRESS, gdt_limit=len(gdt) - 1,
                                          cr3=cr3))
    return Guest(vm, vcpu, memory)


def interrupt_gate(handler: int) -> bytes:
    """A 16-byte long-mode interrupt gate to ``handler`` in the boot code segment."""
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, BOOT_CODE_SELECTOR, 0, INTERRUPT_GATE_64,
        (handler >> 16) & 0xFFFF, handler >> 32, 0,
    )


def install_idt(guest: Guest, handlers: Mapping[int, int]) -> None:
    """Give the guest an IDT with a gate for each ``{vector: handler address}``; other
    vectors up to the highest one are not present."""
    table = bytearray(16 * (max(handlers) + 1))
    for vector, handler in handlers.items():
        table[16 * vector:16 * vector + 16] = interrupt_gate(handler)
    guest.memory.write(layout.BOOT_IDT_ADDRESS, table)
    sregs = guest.vcpu.get_sregs()
    sregs.idt.base = layout.BOOT_IDT_ADDRESS
    sregs.idt.limit = len(table) - 1
    guest.vcpu.set_sregs(sregs)


def run(vcpu: Vcpu, timeout: float = RUN_TIMEOUT_S) -> exits.VcpuExit:
    """``vcpu.run()`` on this thread, kicked out (and failing the test) after ``timeout``
    seconds, so that a guest that never exits cannot hang the test run."""
    install_kick_handler()
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        vcpu.kick()

    vcpu.thread_ident = threading.get_ident()
    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    try:
        event = vcpu.run()
    finally:
        watchdog.cancel()
        watchdog.join()
        vcpu.thread_ident = None
    if fired.is_set():
        vcpu.set_immediate_exit(False)
        raise AssertionError(f"the vCPU did not exit within {timeout} s (last exit: {event!r}, "
                             f"rip=0x{vcpu.get_regs().rip:x})")
    return event


def read_guest(memory: GuestMemory) -> Callable[[int, int], bytes | None]:
    """The ``read_guest`` callable of :mod:`avmm.vcpu_loop`: None where not RAM."""

    def read(address: int, length: int) -> bytes | None:
        try:
            return memory.read(address, length)
        except GuestAddressError:
            return None

    return read


def run_emulating(guest: Guest, timeout: float = RUN_TIMEOUT_S) -> exits.VcpuExit:
    """Like :func:`run`, but pass emulation failures through the userspace fallbacks of
    :mod:`avmm.kvm.x86.emulation`, as :class:`avmm.vcpu_loop.VcpuLoop` does, and return
    the next exit that is not one of those."""
    reader = read_guest(guest.memory)
    while True:
        event = run(guest.vcpu, timeout)
        if not (isinstance(event, exits.InternalError) and event.is_emulation_failure):
            return event
        instruction = emulation.faulting_instruction(guest.vcpu, reader)
        if not emulation.try_emulate(guest.vcpu, instruction):
            raise AssertionError(f"emulation failure at {instruction.describe()}")
