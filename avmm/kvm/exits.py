"""Decoded ``KVM_RUN`` exits: one small value type per exit reason.

``Vcpu.run()`` returns one of these. Buffers in ``IoIn``/``MmioRead`` point into the
vCPU's shared ``kvm_run`` page: fill them before the next ``run()``; they are only valid
until then.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` to I/O ``port``. ``len(data) == size * count`` (string I/O
    repeats ``count`` times)."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``size * count`` bytes from I/O ``port``; write them to ``buffer``."""

    port: int
    size: int
    count: int
    buffer: memoryview


@dataclass(frozen=True, slots=True)
class MmioWrite:
    address: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest reads ``len(buffer)`` bytes at ``address``; write them to ``buffer``."""

    address: int
    buffer: memoryview


@dataclass(frozen=True, slots=True)
class Hlt:
    """The vCPU halted (only seen without an in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The vCPU shut down: on x86 this is a triple fault."""


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A system event: ``kind`` is "shutdown", "reset", "crash" or "unknown(N)"."""

    kind: str
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FailEntry:
    """VM entry failed; ``reason`` is the hardware's entry failure reason."""

    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM gave up; ``suberror`` 1 (KVM_INTERNAL_ERROR_EMULATION) is an emulation failure."""

    suberror: int
    data: tuple[int, ...]

    @property
    def is_emulation_failure(self) -> bool:
        from ._kvm_ffi import lib

        return self.suberror == lib.KVM_INTERNAL_ERROR_EMULATION


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early: ``immediate_exit`` was set or a signal arrived (EINTR)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any other exit reason, kept raw."""

    reason: int
    hardware_reason: int


VcpuExit = (
    IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | SystemEvent | FailEntry
    | InternalError | Interrupted | Unknown
)
