"""The loop a vCPU thread runs: KVM_RUN, dispatch the exit, repeat until stopped.

Register accesses (PIO/MMIO exits) are handled right here on the vCPU thread against
the buses (DESIGN.md, path 1). Anything that ends the VM is reported through the
:class:`StopLatch`; the loop itself never raises for guest misbehaviour.

Pausing: :class:`PauseControl` is shared by a VM's loops. Whoever pauses sets the request
and then kicks every vCPU; a kicked vCPU comes back from KVM_RUN as ``Interrupted``,
clears ``immediate_exit``, sees the request, lets KVM finish the access of its last exit
(serving any exit that makes) and parks on a condition variable until resumed or
stopped. The loop looks at the request only on ``Interrupted`` exits, so the
hot path pays nothing for it: every request is followed by a kick, and the kick's
``immediate_exit`` makes the very next KVM_RUN return ``Interrupted``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import structlog

from .kvm import Vcpu, exits
from .kvm.x86 import emulation
from .lifecycle import HOST_FAILURE_STATUS, StopLatch, StopReason, VmExit, guest_failure

log = structlog.get_logger(__name__)

#: What a bus answers a stray read with, by size (Bus.read).
_ALL_ONES = {size: b"\xff" * size for size in range(1, 9)}
#: How many exits finishing a parked vCPU's last access may make before it parks anyway
#: (a save of its state then refuses: see avmm.state.vcpu.finish_pending_io).
_MAX_FINISHING_EXITS = 1024


class AddressBus(Protocol):
    def read(self, address: int, size: int) -> bytes: ...
    def write(self, address: int, data: bytes) -> bool: ...


class GuestReader(Protocol):
    def __call__(self, address: int, length: int) -> bytes | None: ...


class PauseControl:
    """Where a VM's vCPU threads wait while the VM is paused (thread-safe).

    The event-loop side calls :meth:`request` and then kicks every vCPU; vCPU threads
    call :meth:`park`. ``on_change`` runs (on a vCPU thread, under the lock: it must only
    hand the news to the event loop) whenever the number of parked vCPUs reaches
    ``vcpu_count``.
    """

    def __init__(self, vcpu_count: int, on_change: Callable[[], None] | None = None) -> None:
        self._condition = threading.Condition()
        self._vcpu_count = vcpu_count
        self._on_change = on_change
        self._requested = False
        self._released = False
        self._parked = 0

    @property
    def requested(self) -> bool:
        return self._requested

    def all_parked(self) -> bool:
        """Every vCPU is parked (the VM's pause has taken effect)."""
        with self._condition:
            return self._requested and self._parked == self._vcpu_count

    def request(self) -> None:
        """Ask the vCPUs to park; the caller kicks them next."""
        with self._condition:
            if not self._released:
                self._requested = True

    def resume(self) -> None:
        """Let the parked vCPUs go on where they stopped."""
        with self._condition:
            self._requested = False
            self._condition.notify_all()

    def release(self) -> None:
        """The VM is stopping: wake every parked vCPU for good; nobody parks any more."""
        with self._condition:
            self._released = True
            self._requested = False
            self._condition.notify_all()

    def park(self) -> None:
        """On a vCPU thread: wait while a pause is requested (returns at once if not)."""
        with self._condition:
            if not self._requested:
                return
            self._parked += 1
            try:
                if self._parked == self._vcpu_count and self._on_change is not None:
                    self._on_change()
                while self._requested:
                    self._condition.wait()
            finally:
                self._parked -= 1


class VcpuLoop:
    """Runs one vCPU until the VM's stop latch is set."""

    def __init__(
        self, vcpu: Vcpu, *, pio_bus: AddressBus, mmio_bus: AddressBus,
        read_guest: GuestReader, latch: StopLatch, pause: PauseControl | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.read_guest = read_guest
        self.latch = latch
        self.pause = pause if pause is not None else PauseControl(1)
        #: Exits by kind, for metrics and benchmarks.
        self.exit_counts: dict[str, int] = {}
        #: The vCPU parked with its last access unfinished (the guest kept making
        #: accesses while KVM finished them): its state must not be saved.
        self.io_unfinished = False
        #: The host thread id (gettid) of the thread running this loop, from when it is
        #: placed (on_start has returned) until it returns.
        self.native_id: int | None = None
        #: Called on the vCPU thread with (vCPU id, host thread id) before the first
        #: KVM_RUN: it may block until the thread is placed (avmm.cgroups.StartGate).
        self.on_start: Callable[[int, int], None] | None = None

    def run(self) -> None:
        """Body of the vCPU thread. Returns once a stop was requested (by anyone)."""
        vcpu = self.vcpu
        vcpu.thread_ident = threading.get_ident()
        tid = threading.get_native_id()
        structlog.contextvars.bind_contextvars(vcpu=vcpu.id)
        log.debug("vcpu thread started", tid=tid)
        try:
            if self.on_start is not None:
                self.on_start(vcpu.id, tid)
            # Shown (VirtualMachine.vcpu_threads) once placed, just before the guest runs.
            self.native_id = tid
            self._loop()
        except Exception as e:
            # A bug or host failure: stop this VM with the reason, never the process.
            # Stop first, log second: the log sink itself may be what failed.
            self.latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                      f"{type(e).__name__}: {e}", vcpu.id))
            log.exception("vcpu loop failed")
        finally:
            vcpu.thread_ident = None
            self.native_id = None
            log.debug("vcpu thread finished", exits=self.exit_counts)

    def _loop(self) -> None:
        try:
            self._run_exits()
        finally:
            self._count_absorbed()

    def _run_exits(self) -> None:
        vcpu = self.vcpu
        latch = self.latch
        pause = self.pause
        counts = self.exit_counts
        serve = self._serve
        interrupted = exits.Interrupted
        while not latch.requested:
            # Read before the bus is asked, so that a map change in between (which
            # moves the epoch on) makes absorb() refuse a decision taken on the old map.
            epoch = vcpu.absorb_epoch
            event = vcpu.run()
            kind = type(event)
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
            if kind is not interrupted:
                serve(event, kind, epoch)
                continue
            # A kick (stop or pause), a stray signal, or the C fast path's budget.
            # Clear immediate_exit before looking at the requests: a kick always sets
            # its request first, so a kick that lands after this line is seen below or
            # by the next KVM_RUN.
            vcpu.set_immediate_exit(False)
            self._count_absorbed()
            if pause.requested and not latch.requested:
                self._finish_pending_io()
                pause.park()

    def _serve(self, event: exits.VcpuExit, kind: type, epoch: int) -> None:
        """Answer one exit. Once a bus says an access is a repeat of a stray one that it
        only counts, the vCPU's C fast path (Vcpu.absorb) answers the next ones itself
        inside run(), without coming back here (see _count_absorbed for the counting)."""
        if kind is exits.IoOut:
            pio_write, size = self.pio_bus.write, event.size
            if event.count == 1:
                if not pio_write(event.port, event.data) and self._quiet(
                        self.pio_bus, event.port, size, write=True):
                    self.vcpu.absorb(kind, event.port, size, epoch=epoch)
            else:
                data = event.data
                for i in range(0, len(data), size):
                    pio_write(event.port, data[i:i + size])
        elif kind is exits.IoIn:
            pio_read, size, buffer = self.pio_bus.read, event.size, event.buffer
            for i in range(0, event.size * event.count, size):
                buffer[i:i + size] = data = pio_read(event.port, size)
            if (event.count == 1 and data == _ALL_ONES[size]
                    and self._quiet(self.pio_bus, event.port, size, write=False)):
                self.vcpu.absorb(kind, event.port, size, epoch=epoch)
        elif kind is exits.MmioWrite:
            size = len(event.data)
            if not self.mmio_bus.write(event.address, event.data) and self._quiet(
                    self.mmio_bus, event.address, size, write=True):
                self.vcpu.absorb(kind, event.address, size, epoch=epoch)
        elif kind is exits.MmioRead:
            size = len(event.buffer)
            event.buffer[:] = data = self.mmio_bus.read(event.address, size)
            if data == _ALL_ONES.get(size) and self._quiet(
                    self.mmio_bus, event.address, size, write=False):
                self.vcpu.absorb(kind, event.address, size, epoch=epoch)
        else:
            self._unusual(event)

    @staticmethod
    def _quiet(bus: AddressBus, address: int, size: int, *, write: bool) -> bool:
        """Whether ``bus`` only counts accesses like this one (then the C path may)."""
        is_quiet = getattr(bus, "is_quiet", None)
        return is_quiet is not None and bool(is_quiet(address, size, write=write))

    def _finish_pending_io(self) -> None:
        """Before parking: let KVM finish the access of the last exit, so that a paused
        vCPU's state is whole (a snapshot reads it) and nothing half-done waits in KVM.
        Finishing can make the guest produce further exits (string I/O's next chunk;
        kvm_pvm interprets ring 0 and runs on to the next access): they are served here
        like any other, up to a bound that keeps a guest from holding the pause off."""
        vcpu, counts = self.vcpu, self.exit_counts
        self.io_unfinished = False
        for _ in range(_MAX_FINISHING_EXITS):
            epoch = vcpu.absorb_epoch
            event = vcpu.complete_pending_io()
            if event is None or self.latch.requested:
                return
            kind = type(event)
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
            self._serve(event, kind, epoch)
        self.io_unfinished = True
        log.warning("the vcpu parks with an access KVM has not finished",
                    exits=_MAX_FINISHING_EXITS)

    def _count_absorbed(self) -> None:
        """Fold what the C fast path answered since the last call into the exit counts
        and the buses' unclaimed counters (they lag by at most
        ``avmm.kvm.vcpu.ABSORB_BUDGET`` accesses: run() returns Interrupted at least that
        often while it absorbs)."""
        taken = self.vcpu.take_absorbed()
        if not taken:
            return
        counts = self.exit_counts
        for kind, count in taken.items():
            counts[kind.__name__] = counts.get(kind.__name__, 0) + count
        for bus, read_kind, write_kind in ((self.pio_bus, exits.IoIn, exits.IoOut),
                                           (self.mmio_bus, exits.MmioRead, exits.MmioWrite)):
            count_unclaimed = getattr(bus, "count_unclaimed", None)
            if count_unclaimed is not None:
                count_unclaimed(reads=taken.get(read_kind, 0), writes=taken.get(write_kind, 0))

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
