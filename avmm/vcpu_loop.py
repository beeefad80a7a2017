"""The loop a vCPU thread runs: KVM_RUN, dispatch the exit, repeat until stopped.

Register accesses (PIO/MMIO exits) are handled right here on the vCPU thread against
the buses (DESIGN.md, path 1). Anything that ends the VM is reported through the
:class:`StopLatch`; the loop itself never raises for guest misbehaviour.
"""

from __future__ import annotations

import threading
from typing import Protocol

import structlog

from .kvm import Vcpu, exits
from .kvm.x86 import emulation
from .lifecycle import HOST_FAILURE_STATUS, StopLatch, StopReason, VmExit, guest_failure

log = structlog.get_logger(__name__)


class AddressBus(Protocol):
    def read(self, address: int, size: int) -> bytes: ...
    def write(self, address: int, data: bytes) -> bool: ...


class GuestReader(Protocol):
    def __call__(self, address: int, length: int) -> bytes | None: ...


class VcpuLoop:
    """Runs one vCPU until the VM's stop latch is set."""

    def __init__(
        self, vcpu: Vcpu, *, pio_bus: AddressBus, mmio_bus: AddressBus,
        read_guest: GuestReader, latch: StopLatch,
    ) -> None:
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.read_guest = read_guest
        self.latch = latch
        #: Exits by kind, for metrics and benchmarks.
        self.exit_counts: dict[str, int] = {}

    def run(self) -> None:
        """Body of the vCPU thread. Returns once a stop was requested (by anyone)."""
        vcpu = self.vcpu
        vcpu.thread_ident = threading.get_ident()
        structlog.contextvars.bind_contextvars(vcpu=vcpu.id)
        log.debug("vcpu thread started")
        try:
            self._loop()
        except Exception as e:
            # A bug or host failure: stop this VM with the reason, never the process.
            # Stop first, log second: the log sink itself may be what failed.
            self.latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                      f"{type(e).__name__}: {e}", vcpu.id))
            log.exception("vcpu loop failed")
        finally:
            vcpu.thread_ident = None
            log.debug("vcpu thread finished", exits=self.exit_counts)

    def _loop(self) -> None:
        vcpu = self.vcpu
        pio_read, pio_write = self.pio_bus.read, self.pio_bus.write
        mmio_read, mmio_write = self.mmio_bus.read, self.mmio_bus.write
        latch = self.latch
        counts = self.exit_counts
        io_out, io_in, mmio_w, mmio_r = exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead
        while not latch.requested:
            event = vcpu.run()
            kind = type(event)
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
            if kind is io_out:
                size = event.size
                if event.count == 1:
                    pio_write(event.port, event.data)
                else:
                    data = event.data
                    for i in range(0, len(data), size):
                        pio_write(event.port, data[i:i + size])
            elif kind is io_in:
                size = event.size
                buffer = event.buffer
                for i in range(0, event.size * event.count, size):
                    buffer[i:i + size] = pio_read(event.port, size)
            elif kind is mmio_w:
                mmio_write(event.address, event.data)
            elif kind is mmio_r:
                event.buffer[:] = mmio_read(event.address, len(event.buffer))
            elif kind is exits.Interrupted:
                continue
            else:
                self._unusual(event)

    def _unusual(self, event: exits.VcpuExit) -> None:
        vcpu = self.vcpu
        if isinstance(event, exits.InternalError):
            instruction = emulation.faulting_instruction(vcpu, self.read_guest)
            if event.is_emulation_failure and emulation.try_emulate(vcpu, instruction):
                return
            what = "emulation failure" if event.is_emulation_failure else (
                f"internal error suberror {event.suberror}")
            self._fail(StopReason.INTERNAL_ERROR,
                       f"KVM_EXIT_INTERNAL_ERROR ({what}) at {instruction.describe()}")
        elif isinstance(event, exits.Shutdown):
            instruction = emulation.faulting_instruction(vcpu, self.read_guest)
            self._fail(StopReason.TRIPLE_FAULT,
                       f"KVM_EXIT_SHUTDOWN (triple fault) at {instruction.describe()}")
        elif isinstance(event, exits.FailEntry):
            self._fail(StopReason.FAIL_ENTRY,
                       f"KVM_EXIT_FAIL_ENTRY hardware reason 0x{event.reason:x} "
                       f"at rip=0x{vcpu.get_regs().rip:x}")
        elif isinstance(event, exits.SystemEvent):
            if event.kind == "reset":
                self.latch.request(VmExit(StopReason.RESET, 0, vcpu=vcpu.id))
            elif event.kind == "shutdown":
                self.latch.request(VmExit(StopReason.POWEROFF, 0, vcpu=vcpu.id))
            else:
                self._fail(StopReason.CRASH, f"KVM_EXIT_SYSTEM_EVENT {event.kind}")
        elif isinstance(event, exits.Hlt):
            # Only without an in-kernel irqchip; nothing could wake this vCPU.
            self._fail(StopReason.INTERNAL_ERROR,
                       f"KVM_EXIT_HLT at rip=0x{vcpu.get_regs().rip:x} with no irqchip")
        else:
            self._fail(StopReason.INTERNAL_ERROR, f"unexpected exit {event!r}")

    def _fail(self, reason: StopReason, detail: str) -> None:
        self.latch.request(guest_failure(reason, detail, self.vcpu.id))
        log.error("vcpu stopped the vm", reason=reason.value, detail=detail)
