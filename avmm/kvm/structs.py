"""KVM structs as bytes, and the KVM constants that state code outside this package
needs (so that it never imports the cffi module itself)."""

from __future__ import annotations

from typing import Any

from ._kvm_ffi import ffi, lib


def struct_bytes(cdata: Any) -> bytes:
    """The bytes of a KVM struct (a pointer from one of the getters), as the kernel
    lays it out."""
    return bytes(ffi.buffer(cdata))


def load_struct_bytes(cdata: Any, data: bytes) -> None:
    """Overwrite a KVM struct with ``data`` (exactly its size; ValueError otherwise)."""
    target = ffi.buffer(cdata)
    if len(data) != len(target):
        raise ValueError(f"{ffi.typeof(cdata).item.cname} is {len(target)} bytes, "
                         f"not {len(data)}")
    target[:] = data


MP_STATE_RUNNABLE: int = lib.KVM_MP_STATE_RUNNABLE
MP_STATE_UNINITIALIZED: int = lib.KVM_MP_STATE_UNINITIALIZED
MP_STATE_INIT_RECEIVED: int = lib.KVM_MP_STATE_INIT_RECEIVED
MP_STATE_HALTED: int = lib.KVM_MP_STATE_HALTED
MP_STATE_SIPI_RECEIVED: int = lib.KVM_MP_STATE_SIPI_RECEIVED
VCPUEVENT_VALID_NMI_PENDING: int = lib.KVM_VCPUEVENT_VALID_NMI_PENDING
VCPUEVENT_VALID_SIPI_VECTOR: int = lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
IRQCHIP_PIC_MASTER: int = lib.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE: int = lib.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC: int = lib.KVM_IRQCHIP_IOAPIC
IOAPIC_NUM_PINS: int = lib.KVM_IOAPIC_NUM_PINS
CLOCK_TSC_STABLE: int = lib.KVM_CLOCK_TSC_STABLE
CLOCK_REALTIME: int = lib.KVM_CLOCK_REALTIME
#: The size of ``struct kvm_xsave`` without its flexible tail (KVM_GET_XSAVE's size).
XSAVE_LEGACY_SIZE: int = ffi.sizeof("struct kvm_xsave")
#: The size of ``struct kvm_lapic_state``.
LAPIC_SIZE: int = ffi.sizeof("struct kvm_lapic_state")
