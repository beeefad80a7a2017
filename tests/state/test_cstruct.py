"""from_c/to_c walk a plan made once per dataclass: they copy exactly what the walk over
the type hints copied, and refuse what it refused with its message. Pure cffi: no KVM
needed."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_origin

import pytest
from avmm.kvm._kvm_ffi import ffi
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.kvm.structs import struct_bytes
from avmm.kvm.vm import irqchip_pic
from avmm.state import SnapshotError
from avmm.state._cstruct import _to_c_checked, from_c, to_c
from avmm.state.codec import field_hints, split_annotated
from avmm.state.platform import ClockState, PicState, PitState
from avmm.state.vcpu import DebugRegs, Regs, Sregs, VcpuEvents

#: Each state dataclass mirroring a KVM struct, and how to make an empty struct.
STRUCTS: dict[type, Any] = {
    Regs: lambda: ffi.new("struct kvm_regs *"),
    Sregs: lambda: ffi.new("struct kvm_sregs *"),
    DebugRegs: lambda: ffi.new("struct kvm_debugregs *"),
    VcpuEvents: lambda: ffi.new("struct kvm_vcpu_events *"),
    PitState: lambda: ffi.new("struct kvm_pit_state2 *"),
    ClockState: lambda: ffi.new("struct kvm_clock_data *"),
    PicState: lambda: irqchip_pic(ffi.new("struct kvm_irqchip *")),
}


def _reference_from_c(cls: type, cdata: Any) -> Any:
    """The walk over the type hints, as from_c was before plans."""
    def value(hint: Any, raw: Any) -> Any:
        hint, _ = split_annotated(hint)
        if get_origin(hint) is list:
            (item,) = get_args(hint)
            return [value(item, raw[i]) for i in range(len(raw))]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return _reference_from_c(hint, raw)
        return int(raw)
    return cls(**{name: value(hint, getattr(cdata, name)) for name, hint in field_hints(cls)})


def _filled(cls: type, data: bytes) -> Any:
    cdata = STRUCTS[cls]()
    buffer = ffi.buffer(cdata)
    buffer[:] = (data * (len(buffer) // max(len(data), 1) + 1))[:len(buffer)] if data else \
        bytes(len(buffer))
    return cdata


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(STRUCTS)), st.binary(min_size=1, max_size=64))
def test_copies_are_those_of_the_walk_over_the_hints(cls: type, data: bytes) -> None:
    cdata = _filled(cls, data)
    state = from_c(cls, cdata)
    assert state == _reference_from_c(cls, cdata)
    planned, checked = STRUCTS[cls](), STRUCTS[cls]()
    to_c(state, planned)
    _to_c_checked(state, checked)
    assert struct_bytes(planned) == struct_bytes(checked)
    assert from_c(cls, planned) == state


def _refusal(copy: Any, state: Any, cdata: Any) -> str:
    with pytest.raises(SnapshotError) as caught:
        copy(state, cdata, "sregs")
    return str(caught.value)


@pytest.mark.parametrize("change", [
    lambda s: dataclasses.replace(s, interrupt_bitmap=[0] * 3),
    lambda s: dataclasses.replace(s, cr0=1 << 64),
    lambda s: dataclasses.replace(s, cr0=-1),
    lambda s: dataclasses.replace(s, cs=dataclasses.replace(s.cs, limit=1 << 32)),
    lambda s: dataclasses.replace(s, interrupt_bitmap=[1 << 64, 0, 0, 0]),
    lambda s: dataclasses.replace(s, gdt=dataclasses.replace(s.gdt, base="x")),
])
def test_what_does_not_fit_is_refused_with_the_walks_message(change: Any) -> None:
    state = change(from_c(Sregs, _filled(Sregs, b"\x01\x02")))
    expected = _refusal(_to_c_checked, state, STRUCTS[Sregs]())
    assert expected.startswith("sregs.")
    assert _refusal(to_c, state, STRUCTS[Sregs]()) == expected
