"""A KVM vCPU fd: registers, CPUID, MSRs, LAPIC, events, and ``KVM_RUN``.

Register getters return the cffi struct itself (``struct kvm_regs`` etc.), owned by
Python: change fields and hand it back to the matching setter.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import KvmError
from . import exits
from ._ioctl import NO_ARGUMENT, ioctl
from ._kvm_ffi import ffi, lib
from .system import CpuidEntry

if TYPE_CHECKING:
    from .vm import Vm

_KICK_SIGNAL = lib.avmm_kick_signal()
_kick_handler_lock = threading.Lock()
_kick_handler_installed = False


def install_kick_handler() -> None:
    """Install the no-op handler for the kick signal once per process.

    Must run before any vCPU is kicked: the default action of a real-time signal is to
    terminate the process.
    """
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            if lib.avmm_install_kick_handler() != 0:
                raise KvmError("sigaction", ffi.errno, "cannot install the vCPU kick handler")
            _kick_handler_installed = True


_INTERRUPTED = exits.Interrupted()
_HLT = exits.Hlt()
_SHUTDOWN = exits.Shutdown()

_SYSTEM_EVENT_KINDS = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    lib.KVM_SYSTEM_EVENT_RESET: "reset",
    lib.KVM_SYSTEM_EVENT_CRASH: "crash",
}


class Vcpu:
    """One vCPU. Made by :meth:`Vm.create_vcpu`."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_map = mmap.mmap(fd, vm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_bytes = memoryview(self._run_map)
        self._run = ffi.cast("struct kvm_run *", ffi.from_buffer(self._run_map))
        # The exit union's members sit at fixed places in kvm_run: resolve them once.
        self._io = lib.avmm_run_io(self._run)
        self._mmio = lib.avmm_run_mmio(self._run)
        self._mmio_data = ffi.buffer(self._mmio.data)
        self._run_request = lib.KVM_RUN
        #: ``threading.get_ident()`` of the thread inside ``run()``, for kicks.
        self.thread_ident: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            self._run_bytes.release()
            self._io = self._mmio = self._run = self._mmio_data = None  # type: ignore[assignment]
            try:
                self._run_map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    # -- running -------------------------------------------------------------------------

    def run(self) -> exits.VcpuExit:
        """KVM_RUN once and decode why it returned (see :mod:`avmm.kvm.exits`)."""
        result = lib.ioctl(self.fd, self._run_request, NO_ARGUMENT)
        if result < 0:
            error = ffi.errno
            if error in (errno.EINTR, errno.EAGAIN):
                return _INTERRUPTED
            raise KvmError("KVM_RUN", error, f"vcpu {self.id}")
        run = self._run
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            io = self._io
            size = io.size
            count = io.count
            start = io.data_offset
            data = self._run_bytes[start:start + size * count]
            if io.direction == lib.KVM_EXIT_IO_OUT:
                return exits.IoOut(io.port, size, count, bytes(data))
            return exits.IoIn(io.port, size, count, data)
        if reason == lib.KVM_EXIT_MMIO:
            mmio = self._mmio
            length = mmio.len
            if mmio.is_write:
                return exits.MmioWrite(mmio.phys_addr, self._mmio_data[:length])
            return exits.MmioRead(mmio.phys_addr, memoryview(self._mmio_data)[:length])
        if reason == lib.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == lib.KVM_EXIT_HLT:
            return _HLT
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = lib.avmm_run_system_event(run)
            data = lib.avmm_run_system_event_data(run)
            count = min(event.ndata, 16)
            return exits.SystemEvent(
                _SYSTEM_EVENT_KINDS.get(event.type, f"unknown({event.type})"),
                event.type, tuple(data[i] for i in range(count)),
            )
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fail = lib.avmm_run_fail_entry(run)
            return exits.FailEntry(fail.hardware_entry_failure_reason, fail.cpu)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = lib.avmm_run_internal(run)
            count = min(internal.ndata, 16)
            return exits.InternalError(
                internal.suberror, tuple(internal.data[i] for i in range(count))
            )
        return exits.Unknown(reason, lib.avmm_run_hw(run).hardware_exit_reason)

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``: while set, KVM_RUN returns EINTR at once."""
        self._run.immediate_exit = 1 if value else 0

    def kick(self) -> None:
        """Make the thread inside (or about to enter) ``run()`` return promptly.

        ``immediate_exit`` covers the window before the thread enters KVM_RUN; the signal
        covers a thread already inside it. Safe to call from any thread.
        """
        self.set_immediate_exit(True)
        ident = self.thread_ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, _KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass  # the thread has already finished

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; raises if KVM returns fewer than asked."""
        wanted = list(indices)
        msrs = _msr_buffer(len(wanted))
        for i, index in enumerate(wanted):
            msrs.entries[i].index = index
        got = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        if got != len(wanted):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL,
                           f"MSR 0x{wanted[got]:x} cannot be read on this host")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(got)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS; raises naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = _msr_buffer(len(items))
        for i, (index, data) in enumerate(items):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        written = ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if written != len(items):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"MSR 0x{items[written][0]:x} was refused by KVM")

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        items = list(entries)
        cpuid = ffi.new("struct kvm_cpuid2 *",
                        {"nent": len(items), "entries": max(len(items), 1)})
        for i, entry in enumerate(items):
            target = cpuid.entries[i]
            target.function = entry.function
            target.index = entry.index
            target.flags = entry.flags
            target.eax = entry.eax
            target.ebx = entry.ebx
            target.ecx = entry.ecx
            target.edx = entry.edx
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_lapic(self) -> bytearray:
        """KVM_GET_LAPIC: the 1 KiB LAPIC register page."""
        state = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, "KVM_GET_LAPIC", state)
        return bytearray(ffi.buffer(state.regs))

    def set_lapic(self, registers: bytes | bytearray) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        target = ffi.buffer(state.regs)
        if len(registers) != len(target):
            raise ValueError(f"LAPIC state must be {len(target)} bytes, got {len(registers)}")
        target[:] = bytes(registers)
        ioctl(self.fd, "KVM_SET_LAPIC", state)

    def get_vcpu_events(self) -> Any:
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, "KVM_GET_VCPU_EVENTS", events)
        return events

    def set_vcpu_events(self, events: Any) -> None:
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, "KVM_GET_MP_STATE", state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = mp_state
        ioctl(self.fd, "KVM_SET_MP_STATE", state)

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address for a linear address under the vCPU's
        current paging mode, or None if it is not mapped."""
        request = ffi.new("struct kvm_translation *")
        request.linear_address = linear_address
        ioctl(self.fd, "KVM_TRANSLATE", request)
        if not request.valid:
            return None
        return int(request.physical_address)


def events_exception(events: Any) -> Any:
    """The ``exception`` part of a ``struct kvm_vcpu_events``."""
    return lib.avmm_events_exception_of(events)


def _msr_buffer(count: int) -> Any:
    # cffi sizes a struct ending in a flexible array from the initializer.
    return ffi.new("struct kvm_msrs *", {"nmsrs": count, "entries": max(count, 1)})
