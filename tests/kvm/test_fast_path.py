"""The vCPU's C fast path: accesses listed with ``Vcpu.absorb`` are answered inside
``run()`` (writes dropped, reads all-ones) and counted, never returned; anything else
comes back as usual. Guest programs as in test_vcpu.py (assembly next to the bytes)."""

from __future__ import annotations

import pytest

from avmm.kvm import exits

from .guest import UNMAPPED_MMIO_ADDRESS, run

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"

# mov ecx, 10 ; loop: mov al, cl ; out 0x44, al ; dec ecx ; jnz loop
# in al, 0x45 ; out 0x42, al ; ud2
TEN_OUTS_THEN_IN = bytes.fromhex("b90a000000 88c8 e644 ffc9 75f8 e445 e642") + UD2


def test_absorbed_port_accesses_are_counted_not_returned(make_guest):
    _, vcpu, _ = make_guest(TEN_OUTS_THEN_IN)
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, b"\x0a")
    epoch = vcpu.absorb_epoch
    assert vcpu.absorb(exits.IoOut, 0x44, 1, epoch=epoch)
    assert vcpu.absorb(exits.IoIn, 0x45, 1, epoch=epoch)
    # The other nine writes and the read never come back; the read saw all-ones.
    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\xff")
    assert vcpu.take_absorbed() == {exits.IoOut: 9, exits.IoIn: 1}
    assert vcpu.take_absorbed() == {}
    assert run(vcpu) == exits.Shutdown()


def test_absorbed_mmio_accesses(make_guest):
    # mov ebx, 0xd0000000 ; mov [rbx], eax ; mov [rbx], eax ; mov eax, [rbx]
    # out 0x42, eax ; mov [rbx+4], eax ; ud2
    code = bytes.fromhex("bb000000d0 8903 8903 8b03 e742 894304") + UD2
    _, vcpu, _ = make_guest(code)
    epoch = vcpu.absorb_epoch
    assert vcpu.absorb(exits.MmioWrite, UNMAPPED_MMIO_ADDRESS, 4, epoch=epoch)
    assert vcpu.absorb(exits.MmioRead, UNMAPPED_MMIO_ADDRESS, 4, epoch=epoch)
    assert run(vcpu) == exits.IoOut(0x42, 4, 1, b"\xff" * 4)
    assert vcpu.take_absorbed() == {exits.MmioWrite: 2, exits.MmioRead: 1}
    # Another address is not absorbed.
    assert run(vcpu) == exits.MmioWrite(UNMAPPED_MMIO_ADDRESS + 4, b"\xff" * 4)


def test_only_the_exact_kind_address_and_size_are_absorbed(make_guest):
    _, vcpu, _ = make_guest(TEN_OUTS_THEN_IN)
    epoch = vcpu.absorb_epoch
    assert vcpu.absorb(exits.IoOut, 0x44, 2, epoch=epoch)  # the guest writes bytes
    assert vcpu.absorb(exits.IoIn, 0x44, 1, epoch=epoch)  # ... and does not read there
    assert vcpu.absorb(exits.IoOut, 0x45, 1, epoch=epoch)
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, b"\x0a")
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, b"\x09")
    assert vcpu.take_absorbed() == {}


def test_the_budget_returns_control_as_interrupted(make_guest):
    _, vcpu, _ = make_guest(TEN_OUTS_THEN_IN)
    vcpu.absorb_budget = 4
    assert vcpu.absorb(exits.IoOut, 0x44, 1, epoch=vcpu.absorb_epoch)
    assert run(vcpu) == exits.Interrupted()
    assert vcpu.take_absorbed() == {exits.IoOut: 4}
    assert run(vcpu) == exits.Interrupted()
    assert vcpu.take_absorbed() == {exits.IoOut: 4}
    event = run(vcpu)  # two writes left, then the read, which is not absorbed
    assert isinstance(event, exits.IoIn)
    assert vcpu.take_absorbed() == {exits.IoOut: 2}


def test_stop_absorbing_and_stale_epochs(make_guest):
    _, vcpu, _ = make_guest(TEN_OUTS_THEN_IN)
    stale = vcpu.absorb_epoch
    assert vcpu.absorb(exits.IoOut, 0x44, 1, epoch=stale)
    vcpu.stop_absorbing()  # e.g. a device was mapped there meanwhile
    assert vcpu.absorb_epoch != stale
    # A decision taken before the stop is refused.
    assert not vcpu.absorb(exits.IoOut, 0x44, 1, epoch=stale)
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, b"\x0a")
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, b"\x09")


def test_the_table_is_bounded_and_checks_its_arguments(make_guest):
    from avmm.kvm.vcpu import ABSORB_ENTRIES

    _, vcpu, _ = make_guest(UD2)
    epoch = vcpu.absorb_epoch
    for port in range(ABSORB_ENTRIES):
        assert vcpu.absorb(exits.IoOut, 0x100 + port, 1, epoch=epoch)
    assert not vcpu.absorb(exits.IoOut, 0x200, 1, epoch=epoch)
    with pytest.raises(ValueError, match="cannot absorb"):
        vcpu.absorb(exits.Hlt, 0x44, 1, epoch=epoch)
    with pytest.raises(ValueError, match="cannot absorb"):
        vcpu.absorb(exits.IoOut, 0x44, 16, epoch=epoch)
    with pytest.raises(ValueError, match="budget"):
        vcpu.absorb_budget = 0
