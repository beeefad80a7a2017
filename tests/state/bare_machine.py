"""A bare KVM machine running the test guest, for snapshot round trips below the VM layer.

It is what avmm's VM recipe does, reduced to what the test guest needs: a KVM VM with
the in-kernel irqchip and PIT, guest memory, the test guest loaded by avmm's loader, and
one thread per vCPU that answers the ports the guest uses (COM1's data and line-status
registers, the i8042 reset, the debug-exit port); every other access reads all-ones.
A machine is built either to boot (``cmdline``) or from a snapshot (``restore``).

Run as a program, ``python -m tests.state.bare_machine restore DIR [--copy] [--verify]`` restores
the snapshot in DIR in this new process, runs the guest to its end, writes its serial
output to stdout and exits with the guest's exit code (124 after ``--timeout`` seconds;
2, with one line on stderr, when the snapshot cannot be restored).
"""

from __future__ import annotations

import argparse
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from avmm.arch.x86 import layout
from avmm.arch.x86.cpuid import filter_cpuid
from avmm.arch.x86.loader import load_kernel
from avmm.errors import GuestAddressError
from avmm.kvm import Kvm, Vcpu, exits, install_kick_handler
from avmm.kvm.x86 import emulation
from avmm.memory import MIB, GuestMemory
from avmm.state import (
    MachineState,
    Snapshot,
    SnapshotError,
    SnapshotInfo,
    load_memory,
    read_snapshot,
    restore_machine,
    save_machine,
    write_snapshot,
)
from avmm.x86_vcpu import apply_boot_state, configure_platform_state, wait_for_sipi
from tests.prerequisites import TEST_GUEST

COM1 = 0x3F8
COM1_LCR = COM1 + 3
COM1_LSR = COM1 + 5
LCR_DLAB = 0x80  # while set, COM1's data port is the divisor latch
LSR_TRANSMITTER_EMPTY = 0x60  # THRE | TEMT: the guest may send at once
I8042_COMMAND = 0x64
I8042_RESET = 0xFE
DEBUG_EXIT = 0x501
#: The test guest's mailbox page (tests/guest/README.md).
MAILBOX_ADDRESS = 0x200000
#: The exit code reported for a vCPU that stopped in a way the guest cannot go on from.
CRASHED = 255
@dataclass(frozen=True)
class BareUartState:
    """What the bare machine's COM1 remembers between two port writes: whether the
    divisor latch is open (LCR.DLAB). A stop between the guest's LCR write and its
    divisor writes must keep it, or the restored machine prints the divisor's byte."""

    STATE_VERSION: ClassVar[int] = 1

    divisor_latch: bool


SECTIONS = {"machine": MachineState, "uart": BareUartState}


class BareMachine:
    """One VM; ``start()`` runs its vCPUs in threads until the guest exits or ``stop()``."""

    def __init__(self, *, vcpus: int = 1, memory_mib: int = 0, cmdline: str | None = None,
                 restore: Snapshot | None = None, copy_memory: bool = False,
                 verify_memory: bool | None = None) -> None:
        if (cmdline is None) == (restore is None):
            raise ValueError("give either a command line to boot or a snapshot to restore")
        self._cleanup = ExitStack()
        self.output = bytearray()
        self.exit_code: int | None = None
        self.crash: str | None = None
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # The one bit of UART state this machine keeps, saved in its snapshots (a stop
        # 1 ms after the start can land between the guest's LCR and divisor writes).
        self._divisor_latch = (False if restore is None
                               else restore.sections["uart"].divisor_latch)
        try:
            self._build(vcpus, memory_mib, cmdline, restore, copy_memory, verify_memory)
        except BaseException:
            self._cleanup.close()
            raise

    def _build(self, vcpu_count: int, memory_mib: int, cmdline: str | None,
               restore: Snapshot | None, copy_memory: bool,
               verify_memory: bool | None) -> None:
        machine: MachineState | None = None
        if restore is not None:
            machine = restore.sections["machine"]
            vcpu_count = len(machine.vcpus)
            assert restore.memory is not None
            size = restore.memory.size
        else:
            size = memory_mib * MIB
        self.memory = GuestMemory(size)
        self._cleanup.callback(self.memory.close)
        if restore is not None:
            load_memory(restore, self.memory, copy=copy_memory, verify=verify_memory)
        else:
            boot = load_kernel(self.memory, TEST_GUEST, cmdline=cmdline or "")

        self.kvm = Kvm()
        self._cleanup.callback(self.kvm.close)
        self.vm = self.kvm.create_vm()
        self._cleanup.callback(self.vm.close)
        self.vm.set_tss_address(layout.KVM_TSS_ADDRESS)
        self.vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.guest_address, region.size,
                                           self.memory.host_address(region))
        self.vcpus: list[Vcpu] = []
        for vcpu_id in range(vcpu_count):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._cleanup.callback(vcpu.close)
            self.vcpus.append(vcpu)
        if machine is not None:
            restore_machine(self.vm, self.vcpus, machine)
            return
        supported = self.kvm.supported_cpuid()
        for vcpu in self.vcpus:
            vcpu.set_cpuid2(filter_cpuid(supported, vcpu_id=vcpu.id, vcpu_count=vcpu_count))
            configure_platform_state(vcpu, boot_cpu=vcpu.id == 0)
            if vcpu.id == 0:
                apply_boot_state(vcpu, boot.cpu)
            else:
                wait_for_sipi(vcpu)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        install_kick_handler()
        self._stop.clear()
        for vcpu in self.vcpus:
            vcpu.set_immediate_exit(False)
            thread = threading.Thread(target=self._run_vcpu, args=(vcpu,),
                                      name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Get every vCPU out of KVM_RUN and wait for its thread; the guest can be
        snapshotted then."""
        self._stop.set()
        for vcpu in self.vcpus:
            vcpu.kick()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def wait(self, timeout: float) -> bool:
        """Wait until the guest exits; False if it did not within ``timeout`` s."""
        done = self.finished.wait(timeout)
        self.stop()
        return done

    def serial(self) -> str:
        with self._lock:
            return self.output.decode(errors="replace")

    def mailbox_counter(self) -> int:
        return self.memory.read_u64(MAILBOX_ADDRESS + 8)

    def _finish(self, code: int, crash: str | None = None) -> None:
        with self._lock:
            if self.exit_code is None:
                self.exit_code = code
                self.crash = crash
        self._stop.set()
        self.finished.set()
        for vcpu in self.vcpus:
            vcpu.kick()

    def _run_vcpu(self, vcpu: Vcpu) -> None:
        vcpu.thread_ident = threading.get_ident()
        try:
            while not self._stop.is_set():
                self._handle(vcpu, vcpu.run())
        except BaseException as e:  # a test must see it, not a silent thread death
            self._finish(CRASHED, f"vcpu {vcpu.id}: {e!r}")
        finally:
            vcpu.thread_ident = None

    def _handle(self, vcpu: Vcpu, event: exits.VcpuExit) -> None:
        if isinstance(event, exits.IoOut):
            if event.port == COM1 and not self._divisor_latch:
                with self._lock:
                    self.output += event.data
            elif event.port == COM1_LCR:
                self._divisor_latch = bool(event.data[0] & LCR_DLAB)
            elif event.port == I8042_COMMAND and event.data[:1] == bytes([I8042_RESET]):
                self._finish(0)
            elif event.port == DEBUG_EXIT:
                self._finish(event.data[0])
        elif isinstance(event, exits.IoIn):
            fill = LSR_TRANSMITTER_EMPTY if event.port == COM1_LSR else 0xFF
            event.buffer[:] = bytes([fill]) * len(event.buffer)
        elif isinstance(event, exits.MmioRead):
            event.buffer[:] = b"\xff" * len(event.buffer)
        elif isinstance(event, exits.MmioWrite | exits.Interrupted | exits.Hlt):
            pass
        elif isinstance(event, exits.InternalError) and event.is_emulation_failure:
            instruction = emulation.faulting_instruction(vcpu, self._read_guest)
            if not emulation.try_emulate(vcpu, instruction):
                self._finish(CRASHED, f"vcpu {vcpu.id}: emulation failure at "
                                      f"{instruction.describe()}")
        else:
            self._finish(CRASHED, f"vcpu {vcpu.id}: {event!r} at rip={vcpu.get_regs().rip:#x}")

    def _read_guest(self, address: int, length: int) -> bytes | None:
        try:
            return self.memory.read(address, length)
        except GuestAddressError:
            return None

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, directory: Path) -> SnapshotInfo:
        """Save the stopped machine into the new snapshot directory ``directory``."""
        if self._threads:
            raise RuntimeError("stop() the machine before a snapshot")
        return write_snapshot(directory, {"machine": save_machine(self.vm, self.vcpus),
                                          "uart": BareUartState(self._divisor_latch)},
                              self.memory)

    def close(self) -> None:
        self.stop()
        self._cleanup.close()

    def __enter__(self) -> BareMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore(directory: Path, *, copy_memory: bool = False,
            verify_memory: bool | None = None) -> BareMachine:
    return BareMachine(restore=read_snapshot(directory, SECTIONS), copy_memory=copy_memory,
                       verify_memory=verify_memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.state.bare_machine")
    commands = parser.add_subparsers(dest="command", required=True)
    restore_command = commands.add_parser("restore", help="restore a snapshot and run it")
    restore_command.add_argument("directory", type=Path)
    restore_command.add_argument("--copy", action="store_true",
                                 help="copy the memory file instead of mapping it")
    restore_command.add_argument("--verify", action="store_true", default=None,
                                 help="check the memory file's digest (the default with "
                                      "--copy)")
    restore_command.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        machine = restore(args.directory, copy_memory=args.copy, verify_memory=args.verify)
    except SnapshotError as e:
        # What a user of `avmm up --restore` sees: one line, no traceback.
        print(f"avmm: cannot restore: {e}", file=sys.stderr)
        return 2
    with machine:
        machine.start()
        done = machine.wait(args.timeout)
        sys.stdout.buffer.write(machine.output)
        sys.stdout.flush()
        if machine.crash:
            print(machine.crash, file=sys.stderr)
        return machine.exit_code if done and machine.exit_code is not None else 124


if __name__ == "__main__":
    sys.exit(main())
