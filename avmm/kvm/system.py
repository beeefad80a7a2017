"""``/dev/kvm``: the system fd. Creates VMs and answers capability questions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvmError, KvmUnavailableError
from ._ioctl import ioctl
from ._kvm_ffi import ffi, lib

if TYPE_CHECKING:
    from .vm import Vm

KVM_API_VERSION = 12

#: Capabilities avmm cannot run without, with what each one is for.
REQUIRED_CAPABILITIES = {
    "KVM_CAP_USER_MEMORY": "guest RAM from a userspace mapping",
    "KVM_CAP_IRQCHIP": "the in-kernel IOAPIC/PIC/LAPIC",
    "KVM_CAP_IOEVENTFD": "queue notifications without a userspace exit",
    "KVM_CAP_IRQFD": "interrupts from device tasks",
    "KVM_CAP_SET_TSS_ADDR": "the TSS region Intel VMX needs",
    "KVM_CAP_IMMEDIATE_EXIT": "stopping vCPUs promptly",
}

# Enough for any CPUID KVM reports today; KVM answers E2BIG if not.
_MAX_CPUID_ENTRIES = 256
#: KVM_GET_SUPPORTED_CPUID's answer, once asked (see Kvm.supported_cpuid).
_supported_cpuid: tuple[CpuidEntry, ...] | None = None


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Kvm:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailableError(
                f"{path} does not exist: load the kvm module (kvm_intel or kvm_amd) "
                "or run on a host with virtualization enabled"
            ) from e
        except PermissionError as e:
            raise KvmUnavailableError(
                f"cannot open {path}: permission denied (add your user to the 'kvm' group)"
            ) from e
        try:
            version = ioctl(self.fd, "KVM_GET_API_VERSION")
        except KvmError:
            os.close(self.fd)
            raise
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; avmm needs {KVM_API_VERSION}"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one method per ioctl ------------------------------------------------------------

    def check_extension(self, capability: str | int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, otherwise a capability-specific value."""
        number = getattr(lib, capability) if isinstance(capability, str) else capability
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", number)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to map from each vCPU fd (kvm_run and more)."""
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what this host's KVM offers, the same for every VM,
        so asked once per process (a millisecond or two each time on some hosts)."""
        global _supported_cpuid
        if _supported_cpuid is None:
            _supported_cpuid = tuple(self._ask_supported_cpuid())
        return list(_supported_cpuid)

    def _ask_supported_cpuid(self) -> list[CpuidEntry]:
        cpuid = ffi.new("struct kvm_cpuid2 *",
                        {"nent": _MAX_CPUID_ENTRIES, "entries": _MAX_CPUID_ENTRIES})
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        count = 1024
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msr_list)
        return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM."""
        from .vm import Vm

        return Vm(self, ioctl(self.fd, "KVM_CREATE_VM", 0))

    # -- conveniences --------------------------------------------------------------------

    def missing_capabilities(self) -> list[str]:
        """Names of required capabilities this host lacks, each with what it is for."""
        missing = []
        for name, purpose in REQUIRED_CAPABILITIES.items():
            try:
                present = self.check_extension(name)
            except KvmError:
                present = 0
            if not present:
                missing.append(f"{name} ({purpose})")
        return missing

    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.check_extension(
            "KVM_CAP_NR_VCPUS"
        ) or 4

