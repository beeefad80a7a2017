"""A vCPU parks for a pause only once KVM has finished the access of its last exit, and
serves the exits that finishing makes (kvm_pvm can run the guest on to its next access
even with ``immediate_exit`` set). A scripted vCPU stands in for KVM, so the order of
what the loop does is visible."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from avmm.kvm import exits
from avmm.lifecycle import StopLatch, StopReason, VmExit
from avmm.vcpu_loop import _MAX_FINISHING_EXITS, PauseControl, VcpuLoop


class ScriptedVcpu:
    """What :class:`VcpuLoop` needs of a vCPU; ``run`` and ``complete_pending_io`` take
    their answers from scripts and record every call in ``calls``."""

    id = 0
    absorb_epoch = 0
    thread_ident: int | None = None

    def __init__(self, runs: Iterator[exits.VcpuExit],
                 finishing: Iterator[exits.VcpuExit | None]) -> None:
        self.runs, self.finishing = runs, finishing
        self.calls: list[str] = []

    def run(self) -> exits.VcpuExit:
        self.calls.append("run")
        return next(self.runs)

    def complete_pending_io(self) -> exits.VcpuExit | None:
        self.calls.append("complete")
        return next(self.finishing)

    def set_immediate_exit(self, value: bool) -> None:
        pass

    def take_absorbed(self) -> dict[type, int]:
        return {}

    def absorb(self, *args: object, **kwargs: object) -> bool:
        return False


class RecordingBus:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def read(self, address: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, address: int, data: bytes) -> bool:
        self.calls.append(f"write {address:#x} {data.hex()}")
        return True


def run_until_parked(vcpu: ScriptedVcpu) -> VcpuLoop:
    """Run a loop on ``vcpu`` with a pause requested; once it parks, stop it."""
    parked = threading.Event()
    pause = PauseControl(1, on_change=parked.set)
    pause.request()
    latch = StopLatch(lambda _exit: None)
    bus = RecordingBus(vcpu.calls)
    loop = VcpuLoop(vcpu, pio_bus=bus, mmio_bus=bus,  # type: ignore[arg-type]
                    read_guest=lambda address, length: None, latch=latch, pause=pause)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        assert parked.wait(10), vcpu.calls
        vcpu.calls.append("parked")
    finally:
        latch.request(VmExit(StopReason.STOPPED, 0))
        pause.release()
        thread.join(10)
    assert not thread.is_alive()
    return loop


def test_the_exits_made_while_finishing_are_served_before_parking() -> None:
    vcpu = ScriptedVcpu(
        runs=iter([exits.Interrupted()]),
        finishing=iter([exits.IoOut(0x3F9, 1, 1, b"\x01"), exits.IoOut(0x43, 1, 1, b"\x02"),
                        None]))
    loop = run_until_parked(vcpu)
    assert vcpu.calls == ["run", "complete", "write 0x3f9 01", "complete", "write 0x43 02",
                          "complete", "parked"]
    assert not loop.io_unfinished
    assert loop.exit_counts == {"Interrupted": 1, "IoOut": 2}


def test_a_guest_that_keeps_making_accesses_cannot_hold_the_pause_off() -> None:
    vcpu = ScriptedVcpu(runs=iter([exits.Interrupted()]),
                        finishing=iter(lambda: exits.IoOut(0x80, 1, 1, b"\x00"), None))
    loop = run_until_parked(vcpu)
    assert vcpu.calls.count("complete") == _MAX_FINISHING_EXITS
    assert vcpu.calls[-1] == "parked"
    assert loop.io_unfinished  # the VM refuses to save this vCPU's state
