"""Why a VM stopped, and the latch that records the first reason thread-safely."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class StopReason(StrEnum):
    """Why a VM stopped. The value is what logs and the API show."""

    DEBUG_EXIT = "debug-exit"  # the guest wrote to the debug-exit port
    RESET = "reset"  # i8042 reset or a KVM reset event: the guest's way to shut down
    POWEROFF = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN (e.g. ACPI/PSCI off)
    STOPPED = "stopped"  # the host asked (vm.stop(), Ctrl-A x, leaving `async with`)
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"  # KVM could not continue (e.g. emulation failure)
    FAIL_ENTRY = "fail-entry"
    CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    ERROR = "error"  # a bug or host failure inside avmm while running the VM
    MIGRATED = "migrated"  # handed over to a migration's destination (vm.migrate())


#: Exit status (for ``avmm up``) of VMs that failed rather than ended. Even, so that it
#: never collides with a debug-exit status, which is always odd.
GUEST_FAILURE_STATUS = 4
HOST_FAILURE_STATUS = 6

_FAILURES = {
    StopReason.TRIPLE_FAULT, StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY,
    StopReason.CRASH,
}


@dataclass(frozen=True)
class VmExit:
    """How a VM ended.

    ``exit_status`` is what ``avmm up`` exits with (mod 256): 0 for a clean shutdown
    (reset, power-off, host stop), ``(v << 1) | 1`` for a debug-exit write of ``v``,
    4 for a guest failure and 6 for a host-side error. ``detail`` explains failures
    (exit name, RIP, instruction bytes).
    """

    reason: StopReason
    exit_status: int
    detail: str = ""
    vcpu: int | None = None

    @property
    def failed(self) -> bool:
        return self.reason in _FAILURES or self.reason is StopReason.ERROR

    def __str__(self) -> str:
        text = f"{self.reason.value} (exit status {self.exit_status})"
        if self.vcpu is not None:
            text += f" on vcpu {self.vcpu}"
        if self.detail:
            text += f": {self.detail}"
        return text


def guest_failure(reason: StopReason, detail: str, vcpu: int | None = None) -> VmExit:
    return VmExit(reason, GUEST_FAILURE_STATUS, detail, vcpu)


class StopLatch:
    """Records the first stop request; later ones are ignored.

    ``request`` may be called from any thread (vCPU threads, device handlers, the event
    loop). ``on_stop`` runs once, in the requesting thread, outside the lock.
    """

    def __init__(self, on_stop: Callable[[VmExit], None]) -> None:
        self._lock = threading.Lock()
        self._exit: VmExit | None = None
        self._on_stop = on_stop

    @property
    def requested(self) -> bool:
        return self._exit is not None

    @property
    def exit(self) -> VmExit | None:
        return self._exit

    def request(self, vm_exit: VmExit) -> bool:
        """Record ``vm_exit`` if nothing was recorded yet; True if this call won."""
        with self._lock:
            if self._exit is not None:
                return False
            self._exit = vm_exit
        self._on_stop(vm_exit)
        return True


class VmState(StrEnum):
    """Where a VM is in its life. The value is what logs and the API show.

    STARTING (being built) → RUNNING ⇄ PAUSED → STOPPING (a stop was requested; vCPUs
    and devices are winding down) → STOPPED (everything joined and released). A VM made
    by ``VirtualMachine.receive`` is INCOMING (listening, then receiving a migration)
    before it runs, or STOPPED if the migration fails.
    """

    INCOMING = "incoming"

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class DeviceMetrics:
    """Counters of one virtio device since the VM started (they survive driver resets).

    ``requests``: descriptor chains the device completed (used ring entries pushed).
    ``bytes``: bytes the device wrote into guest buffers (the used entries' lengths) plus
    the device-readable bytes of the chains it took. ``notifications``: driver kicks
    (queue notifications) received. For a vhost-user device the data path bypasses
    avmm: ``requests`` is read from the used rings in guest memory, ``bytes`` and
    ``notifications`` are not visible and stay 0.
    """

    kind: str
    requests: int = 0
    bytes: int = 0
    notifications: int = 0


@dataclass
class VmMetrics:
    """A VM's counters at one moment."""

    state: VmState
    #: KVM exits by kind (``IoOut``, ``MmioWrite``, ``Interrupted``, ...), all vCPUs.
    vcpu_exits: dict[str, int]
    #: Device name ("blk0") → counters.
    devices: dict[str, DeviceMetrics]
