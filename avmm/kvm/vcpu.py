"""A KVM vCPU fd: registers, CPUID, MSRs, LAPIC, events, and ``KVM_RUN``.

Register getters return the cffi struct itself (``struct kvm_regs`` etc.), owned by
Python: change fields and hand it back to the matching setter. The getters and setters of
the rest of a vCPU's state (XSAVE, XCRs, debug registers, TSC frequency, the CPUID it was
given) are here for snapshots; :mod:`avmm.state.vcpu` knows the order KVM needs them in.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import KvmError
from . import exits
from ._ioctl import ioctl
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

# The hot path of run(): avmm_vcpu_run() issues KVM_RUN and decodes the common exits in
# C into an avmm_exit_info {u64 address; u32 size; u32 count; u64 data_offset}, which
# one struct unpack turns into Python values.
_vcpu_run = lib.avmm_vcpu_run
_vcpu_run_absorbing = lib.avmm_vcpu_run_absorbing
_RUN_IO_OUT = lib.AVMM_RUN_IO_OUT
_RUN_IO_IN = lib.AVMM_RUN_IO_IN
_RUN_MMIO_WRITE = lib.AVMM_RUN_MMIO_WRITE
_RUN_MMIO_READ = lib.AVMM_RUN_MMIO_READ
_RUN_INTERRUPTED = lib.AVMM_RUN_INTERRUPTED
_EXIT_INFO = struct.Struct("=QIIQ")
assert _EXIT_INFO.size == ffi.sizeof("avmm_exit_info")
_unpack_exit_info = _EXIT_INFO.unpack_from
_EINTR_EAGAIN = (errno.EINTR, errno.EAGAIN)

#: How many accesses the C fast path (Vcpu.absorb) answers before run() returns anyway
#: (as Interrupted), so that the caller's counters and requests stay fresh.
ABSORB_BUDGET = 4096
#: How many distinct accesses the C fast path can answer.
ABSORB_ENTRIES = lib.AVMM_ABSORB_ENTRIES
_ABSORB_KINDS: dict[type, int] = {
    exits.IoOut: _RUN_IO_OUT, exits.IoIn: _RUN_IO_IN,
    exits.MmioWrite: _RUN_MMIO_WRITE, exits.MmioRead: _RUN_MMIO_READ,
}

# The exit values are frozen slotted dataclasses, whose generated __init__ sets each field
# through object.__setattr__; setting the slots through their own descriptors builds the
# same value for about half the cost, on the path every register access takes.
_new_object = object.__new__


def _fast_constructor(cls: type, *names: str) -> Any:
    setters = tuple(getattr(cls, name).__set__ for name in names)
    if len(setters) == 2:
        set_a, set_b = setters

        def make2(a: object, b: object) -> Any:
            event = _new_object(cls)
            set_a(event, a)
            set_b(event, b)
            return event

        return make2
    set_a, set_b, set_c, set_d = setters

    def make4(a: object, b: object, c: object, d: object) -> Any:
        event = _new_object(cls)
        set_a(event, a)
        set_b(event, b)
        set_c(event, c)
        set_d(event, d)
        return event

    return make4


_io_out = _fast_constructor(exits.IoOut, "port", "size", "count", "data")
_io_in = _fast_constructor(exits.IoIn, "port", "size", "count", "buffer")
_mmio_write = _fast_constructor(exits.MmioWrite, "address", "data")
_mmio_read = _fast_constructor(exits.MmioRead, "address", "buffer")

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
        self._mmio = lib.avmm_run_mmio(self._run)
        self._mmio_data = ffi.buffer(self._mmio.data)
        self._exit_info = ffi.new("avmm_exit_info *")
        self._exit_info_bytes = ffi.buffer(self._exit_info)
        # The C fast path's table (see absorb()); _absorbing mirrors "count > 0" so that
        # run() need not read cdata to choose.
        self._absorb = ffi.new("avmm_absorb *")
        self._absorb.budget = ABSORB_BUDGET
        self._absorb_lock = threading.Lock()
        self._absorbing = False
        #: Moves on with every :meth:`stop_absorbing`; see :meth:`absorb`.
        self.absorb_epoch = 0
        #: ``threading.get_ident()`` of the thread inside ``run()``, for kicks.
        self.thread_ident: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            self._run_bytes.release()
            self._mmio = self._run = self._mmio_data = None  # type: ignore[assignment]
            try:
                self._run_map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    # -- running -------------------------------------------------------------------------

    def run(self) -> exits.VcpuExit:
        """KVM_RUN once and decode why it returned (see :mod:`avmm.kvm.exits`)."""
        if self._absorbing:
            kind = _vcpu_run_absorbing(self.fd, self._run, self._exit_info, self._absorb)
        else:
            kind = _vcpu_run(self.fd, self._run, self._exit_info)
        return self._decode(kind)

    def _decode(self, kind: int) -> exits.VcpuExit:
        """The exit ``avmm_vcpu_run`` reported as ``kind``."""
        # Every PIO/MMIO exit passes here: one C call, one unpack, no cdata field reads.
        if kind == _RUN_IO_OUT:
            port, size, count, start = _unpack_exit_info(self._exit_info_bytes)
            # Slicing the mmap copies straight into bytes.
            return _io_out(port, size, count, self._run_map[start:start + size * count])
        if kind == _RUN_MMIO_WRITE:
            address, length, _, _ = _unpack_exit_info(self._exit_info_bytes)
            return _mmio_write(address, self._mmio_data[:length])
        if kind == _RUN_MMIO_READ:
            address, length, _, _ = _unpack_exit_info(self._exit_info_bytes)
            return _mmio_read(address, memoryview(self._mmio_data)[:length])
        if kind == _RUN_IO_IN:
            port, size, count, start = _unpack_exit_info(self._exit_info_bytes)
            return _io_in(port, size, count, self._run_bytes[start:start + size * count])
        if kind == _RUN_INTERRUPTED:
            return _INTERRUPTED
        if kind < 0:
            if -kind in _EINTR_EAGAIN:
                return _INTERRUPTED
            raise KvmError("KVM_RUN", -kind, f"vcpu {self.id}")
        return self._decode_other()

    def _decode_other(self) -> exits.VcpuExit:
        """The exits that are not register accesses (rare: decoded from kvm_run here)."""
        run = self._run
        reason = run.exit_reason
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

    # -- the C fast path ------------------------------------------------------------------

    def absorb(self, kind: type, address: int, size: int, *, epoch: int) -> bool:
        """From now on answer single accesses of ``kind`` (``IoOut``, ``IoIn``,
        ``MmioWrite`` or ``MmioRead``) at ``address`` of ``size`` bytes inside
        :meth:`run`, in C, without returning: writes are dropped, reads see all-ones.
        Meant for addresses no device claims, which guests hit in loops (port 0x80
        delays, probes of absent devices). They are counted, not returned: see
        :meth:`take_absorbed`. :meth:`run` still returns ``Interrupted`` at least every
        :data:`ABSORB_BUDGET` absorbed accesses, and at once when kicked.

        ``epoch`` is :attr:`absorb_epoch` as read *before* the caller decided that the
        address is unclaimed: if :meth:`stop_absorbing` ran since (the address map
        changed), nothing is added. Returns whether the access is absorbed now (False
        also when all :data:`ABSORB_ENTRIES` entries are taken). Call it on the thread
        that runs the vCPU, between runs.
        """
        code = _ABSORB_KINDS.get(kind)
        if code is None or not 0 < size <= 8 or not 0 <= address < 1 << 64:
            raise ValueError(f"cannot absorb {getattr(kind, '__name__', kind)} accesses of "
                             f"{size} bytes at {address:#x}")
        with self._absorb_lock:
            table = self._absorb
            count = table.count
            if epoch != self.absorb_epoch or count >= ABSORB_ENTRIES:
                return False
            entry = table.entries[count]
            entry.kind = code
            entry.size = size
            entry.address = address
            # The entry is complete before the count that publishes it (x86 keeps stores
            # in order; each is a separate C-level store).
            table.count = count + 1
            self._absorbing = True
        return True

    @property
    def absorb_budget(self) -> int:
        """How many accesses one :meth:`run` answers in C before it returns anyway."""
        return int(self._absorb.budget)

    @absorb_budget.setter
    def absorb_budget(self, value: int) -> None:
        if not 1 <= value < 1 << 32:
            raise ValueError(f"absorb budget must be 1 .. 2^32-1, got {value}")
        self._absorb.budget = value

    def stop_absorbing(self) -> None:
        """Forget every absorbed access (the address map changed). Safe from any thread:
        a :meth:`run` in progress answers at most the access at hand from the old
        table."""
        with self._absorb_lock:
            self._absorb.count = 0
            self._absorbing = False
            self.absorb_epoch += 1

    def take_absorbed(self) -> dict[type, int]:
        """The accesses :meth:`run` answered in C since the last call, by exit class
        (only non-zero counts). Call it on the thread that runs the vCPU, between runs."""
        counts = self._absorb.absorbed
        if not counts[0]:  # the total: one read when nothing was absorbed
            return {}
        counts[0] = 0
        taken: dict[type, int] = {}
        for kind, code in _ABSORB_KINDS.items():
            value = counts[code]
            if value:
                taken[kind] = int(value)
                counts[code] = 0
        return taken

    def complete_pending_io(self) -> exits.VcpuExit | None:
        """KVM_RUN with ``immediate_exit`` set, to finish the I/O or MMIO access of the
        last exit (an ``in`` or MMIO read takes the data userspace put in ``kvm_run``)
        without running the guest on. KVM keeps that half-done access in no state
        userspace can read, so it must be finished before the vCPU's state is saved
        (KVM's api.rst, KVM_RUN).

        Returns None once KVM has finished (it answered EINTR), or the exit the guest
        made while KVM finished the access: string I/O goes on with its next chunk, and
        kvm_pvm's ring-0 interpreter can run on to the next access. The caller serves
        that exit like any other and calls again. Call it on a vCPU no thread is running;
        ``immediate_exit`` keeps its previous value.
        """
        previous = self._run.immediate_exit
        self._run.immediate_exit = 1
        try:
            # Never the absorbing variant: an access it answered itself would be lost.
            event = self._decode(_vcpu_run(self.fd, self._run, self._exit_info))
        finally:
            self._run.immediate_exit = previous
        return None if event is _INTERRUPTED else event

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``: while set, KVM_RUN returns EINTR at once."""
        self._run.immediate_exit = 1 if value else 0

    def kick(self) -> None:
        """Make the thread inside (or about to enter) ``run()`` return promptly.

        ``immediate_exit`` covers the window before the thread enters KVM_RUN; the signal
        covers a thread already inside it. Safe to call from any thread.
        """
        run = self._run
        if run is None:
            return  # closed: no thread runs it any more
        run.immediate_exit = 1
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

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the 4 KiB legacy XSAVE area (x87, SSE and AVX state)."""
        area = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, "KVM_GET_XSAVE", area)
        return bytes(ffi.buffer(area))

    def get_xsave2(self, size: int) -> bytes:
        """KVM_GET_XSAVE2: the whole XSAVE area, ``size`` bytes as
        ``Vm.check_extension("KVM_CAP_XSAVE2")`` reports it (at least 4096)."""
        if size < ffi.sizeof("struct kvm_xsave"):
            raise ValueError(f"an XSAVE area is at least {ffi.sizeof('struct kvm_xsave')} "
                             f"bytes, not {size}")
        buffer = ffi.new("char[]", size)
        ioctl(self.fd, "KVM_GET_XSAVE2", ffi.cast("struct kvm_xsave *", buffer))
        return bytes(ffi.buffer(buffer))

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE. KVM reads as many bytes as KVM_CAP_XSAVE2 says (4096 without
        it): a shorter area (at least 4096 bytes) is padded with zeros, components it
        lacks stay in their initial state; a longer one is refused rather than cut."""
        legacy = ffi.sizeof("struct kvm_xsave")
        expected = max(self.vm.check_extension("KVM_CAP_XSAVE2"), legacy)
        if not legacy <= len(area) <= expected:
            raise ValueError(f"this host's XSAVE area is {legacy} to {expected} bytes; the "
                             f"one given has {len(area)}")
        buffer = ffi.new("char[]", expected)
        ffi.buffer(buffer)[:len(area)] = area
        ioctl(self.fd, "KVM_SET_XSAVE", ffi.cast("struct kvm_xsave *", buffer))

    def get_xcrs(self) -> Any:
        """KVM_GET_XCRS: ``struct kvm_xcrs`` (``nr_xcrs`` entries of ``xcrs``)."""
        xcrs = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, "KVM_GET_XCRS", xcrs)
        return xcrs

    def set_xcrs(self, xcrs: Any) -> None:
        ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_debugregs(self) -> Any:
        """KVM_GET_DEBUGREGS: ``struct kvm_debugregs`` (DR0-3, DR6, DR7)."""
        debugregs = ffi.new("struct kvm_debugregs *")
        ioctl(self.fd, "KVM_GET_DEBUGREGS", debugregs)
        return debugregs

    def set_debugregs(self, debugregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_DEBUGREGS", debugregs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency in kHz."""
        return ioctl(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (needs KVM_CAP_TSC_CONTROL unless ``khz`` is the host's)."""
        if not 0 < khz < 1 << 32:
            raise ValueError(f"TSC frequency must be 1 .. 2^32-1 kHz, got {khz}")
        ioctl(self.fd, "KVM_SET_TSC_KHZ", khz)

    def get_cpuid2(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID entries this vCPU was given with KVM_SET_CPUID2."""
        capacity = 256
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": capacity, "entries": capacity})
            try:
                ioctl(self.fd, "KVM_GET_CPUID2", cpuid)
            except KvmError as e:
                if e.errno != errno.E2BIG or capacity >= 1 << 14:
                    raise
                capacity *= 4
                continue
            return [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))
            ]

    def read_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS as KVM answers it: KVM stops at the first MSR it refuses, so the
        result holds the leading ``indices`` it could read, in order (an empty dict if
        it refused the first). See :meth:`get_msrs` for all-or-nothing."""
        wanted = list(indices)
        if not wanted:
            return {}
        msrs = _msr_buffer(len(wanted))
        for i, index in enumerate(wanted):
            msrs.entries[i].index = index
        got = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(min(got, len(wanted)))}

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
