"""The /dev/kvm system fd: API version, capabilities, CPUID and MSR lists, and how a failed
ioctl is reported."""

from __future__ import annotations

import errno
import mmap

import pytest

from avmm.errors import AvmmError, KvmError, KvmUnavailableError
from avmm.kvm import Kvm
from avmm.kvm.system import KVM_API_VERSION, REQUIRED_CAPABILITIES
from avmm.memory import GuestMemory
from avmm.x86_vcpu import MSR_IA32_TSC

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm():
    with Kvm() as kvm:
        yield kvm


def test_api_version_accepted(kvm):
    # Kvm() checks KVM_GET_API_VERSION itself and refuses any other version
    assert KVM_API_VERSION == 12
    assert kvm.fd >= 0


def test_close_is_idempotent():
    kvm = Kvm()
    kvm.close()
    kvm.close()
    assert kvm.fd == -1


def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(KvmUnavailableError, match="does not exist") as caught:
        Kvm(str(tmp_path / "kvm"))
    assert isinstance(caught.value, AvmmError)


def test_required_capabilities_present(kvm):
    assert kvm.missing_capabilities() == []
    for name in REQUIRED_CAPABILITIES:
        assert kvm.check_extension(name) > 0, name
    # by name or by number (KVM_CAP_IRQFD is 32 in <linux/kvm.h>), the same answer
    assert kvm.check_extension(32) == kvm.check_extension("KVM_CAP_IRQFD")


def test_max_vcpus_and_mmap_size(kvm):
    assert kvm.max_vcpus() >= 1
    size = kvm.vcpu_mmap_size()
    assert size >= mmap.PAGESIZE
    assert size % mmap.PAGESIZE == 0


def test_supported_cpuid(kvm):
    entries = kvm.supported_cpuid()
    assert entries
    leaves = {entry.function: entry for entry in entries}
    assert 0 in leaves
    assert 1 in leaves
    assert leaves[0].eax >= 1  # the highest basic leaf
    vendor = b"".join(
        value.to_bytes(4, "little") for value in (leaves[0].ebx, leaves[0].edx, leaves[0].ecx)
    )
    assert len(vendor) == 12
    assert vendor.isascii()
    assert 0x8000_0000 in leaves  # and the extended range


def test_msr_index_list(kvm):
    indices = kvm.msr_index_list()
    assert indices
    assert MSR_IA32_TSC in indices
    assert all(0 <= index < 1 << 32 for index in indices)


def test_create_vm_and_close(kvm):
    vm = kvm.create_vm()
    assert vm.fd >= 0
    assert vm.vcpu_mmap_size == kvm.vcpu_mmap_size()
    vm.close()
    vm.close()
    assert vm.fd == -1


def test_kvm_error_names_the_ioctl_and_errno(kvm):
    vm = kvm.create_vm()
    memory = GuestMemory(1 << 20)
    try:
        with pytest.raises(KvmError) as caught:
            # guest addresses must be page aligned
            vm.set_user_memory_region(0, 0x1001, 1 << 20, memory.host_base)
    finally:
        vm.close()
        memory.close()
    error = caught.value
    assert isinstance(error, AvmmError)
    assert error.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert error.errno == errno.EINVAL
    assert "KVM_SET_USER_MEMORY_REGION" in str(error)
    assert "EINVAL" in str(error)


def test_duplicate_vcpu_id_is_eexist(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    try:
        with pytest.raises(KvmError) as caught:
            vm.create_vcpu(0)
    finally:
        vcpu.close()
        vm.close()
    assert caught.value.ioctl == "KVM_CREATE_VCPU"
    assert caught.value.errno == errno.EEXIST
    assert str(caught.value).startswith("KVM_CREATE_VCPU failed: EEXIST")
