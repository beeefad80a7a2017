"""The direct writer (avmm.state._writer) writes exactly the bytes the construct
declarations build: on real states of a running VM (every section), on the sample
states, and on generated values of every kind the codec encodes — and it refuses what
they refuse. The construct declaration stays the reference; FORMAT_VERSION does not
move because the bytes do not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmm import VirtualMachine
from avmm.config import DiskConfig, RngConfig
from avmm.state import MachineState
from avmm.state.codec import (
    _ANY_INT,
    U8,
    U16,
    U64,
    Record,
    build_value,
    build_value_with_construct,
    encode,
    field_hints,
    split_annotated,
    to_plain,
)
from avmm.state.format import build_state, build_state_with_construct, parse_state
from avmm.state.vm_state import (
    ConfigState,
    LegacyDevicesState,
    VirtioDevicesState,
    config_to_state,
)
from tests.snapshot.support import MEM_WALK, TIMEOUT_S
from tests.vm.helpers import guest_config

from .samples import machine_state, platform_state
from .test_codec import SAMPLE, Point, Sample

SECTIONS = {"config": ConfigState, "machine": MachineState, "devices": LegacyDevicesState,
            "virtio": VirtioDevicesState}


def _same_bytes(value: Any) -> bytes:
    """``encode(value)``, checked against the construct declaration."""
    fast = encode(value)
    assert fast == build_value_with_construct(to_plain(value))
    return fast


# -- real and sample states -------------------------------------------------------------


def test_sample_states_are_written_as_construct_builds_them() -> None:
    for value in (SAMPLE, machine_state(1), machine_state(3), platform_state()):
        _same_bytes(value)
    sections = {"machine": machine_state(2), "platform": platform_state(), "absent": None}
    assert build_state(sections) == build_state_with_construct(sections)


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_running_vms_state_is_written_as_construct_builds_it(tmp_path: Path) -> None:
    """Every section of a paused mem-walk VM with a disk and an rng device: the
    state a snapshot or a migration writes."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = dataclasses.replace(guest_config(MEM_WALK, vcpus=2), disks=(DiskConfig(image),),
                                 rng=RngConfig())
    async with VirtualMachine(config) as vm:
        with trio.fail_after(TIMEOUT_S):
            output = bytearray()
            while b"mem-walk round=1 " not in output:
                output += await vm.serial.receive_some()
        await vm.pause()
        sections = {"config": config_to_state(vm._config_in_effect()),
                    **await vm._migration_state()}
        vm.stop()
    for name, value in sections.items():
        assert _same_bytes(value), name
    data = build_state(sections)
    assert data == build_state_with_construct(sections)
    assert parse_state(data, SECTIONS) == sections


# -- generated values -------------------------------------------------------------------

_EDGE_INTS = [0, 1, -1, 63, 64, -64, -65, 127, 128, 255, 256, 16383, 16384, (1 << 32) - 1,
              1 << 32, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1]
_INTS = st.one_of(st.sampled_from(_EDGE_INTS),
                  st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1))
_NAMES = st.text(max_size=12)
_SCALARS = st.one_of(st.none(), st.booleans(), _INTS, st.binary(max_size=300),
                     st.text(max_size=300))
_PLAIN = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.builds(Record, _NAMES, st.integers(min_value=0, max_value=(1 << 64) - 1),
                  st.dictionaries(_NAMES, inner, max_size=5)),
        st.dictionaries(st.one_of(_INTS, _NAMES), inner, max_size=5),
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(_PLAIN)
def test_generated_plain_values_are_written_as_construct_builds_them(plain: Any) -> None:
    assert build_value(plain) == build_value_with_construct(plain)


@pytest.mark.parametrize("plain", [1 << 69, -(1 << 69), 1 << 70, -(1 << 70) - 1,
                                   Record("R", -1, {}), Record("R", 1 << 70, {}),
                                   bytearray(b"x"), 1.5, ("a",)])
def test_what_construct_refuses_to_build_the_writer_refuses(plain: Any) -> None:
    """Integers whose zigzag form needs more than a 10-byte varint, a negative or huge
    record version, types the codec does not know."""
    outcomes: list[object] = []
    for build in (build_value, build_value_with_construct):
        try:
            outcomes.append(build(plain))
        except Exception:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


def _strategy(hint: Any) -> st.SearchStrategy[Any]:
    """Values of a state's declared type (any that fits it), from its type hints."""
    from avmm.state.codec import _optional_of

    base, int_range = split_annotated(hint)
    inner = _optional_of(base)
    if inner is not None:
        return st.one_of(st.none(), _strategy(inner))
    if base is bool:
        return st.booleans()
    if base is int:
        allowed = int_range or _ANY_INT
        edges = [value for value in _EDGE_INTS if allowed.low <= value <= allowed.high]
        return st.one_of(st.sampled_from(edges),
                         st.integers(min_value=allowed.low, max_value=allowed.high))
    if base is bytes:
        return st.one_of(st.binary(max_size=200), st.binary(max_size=8).map(bytearray))
    if base is str:
        return st.text(max_size=40)
    origin = getattr(base, "__origin__", None)
    if origin is list:
        (item,) = base.__args__
        items = st.lists(_strategy(item), max_size=4)
        return st.one_of(items, items.map(tuple))
    if origin is dict:
        key, value = base.__args__
        return st.dictionaries(_strategy(key), _strategy(value), max_size=4)
    assert dataclasses.is_dataclass(base), hint
    return st.builds(base, **{name: st.deferred(lambda h=h: _strategy(h))  # type: ignore[misc]
                              for name, h in field_hints(base)})


@dataclass(frozen=True)
class Tree:
    """A dataclass that contains itself, and every kind of field."""

    STATE_VERSION: ClassVar[int] = 200  # a two-byte version varint

    label: str
    children: list[Tree]
    leaf: Sample | None
    weights: dict[str, U8]
    ids: dict[int, U64]
    small: U16
    raw: bytes


def _trees() -> st.SearchStrategy[Tree]:
    """Trees a few levels deep (a recursive strategy: the derived one has no bound)."""
    def tree(children: st.SearchStrategy[list[Tree]]) -> st.SearchStrategy[Tree]:
        fields = {name: _strategy(hint) for name, hint in field_hints(Tree)
                  if name != "children"}
        return st.builds(Tree, children=children, **fields)

    return st.recursive(tree(st.just([])), lambda inner: tree(st.lists(inner, max_size=3)),
                        max_leaves=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(_strategy(Sample), _trees(), _strategy(Point)))
def test_generated_states_are_written_as_construct_builds_them(value: Any) -> None:
    _same_bytes(value)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(*(_strategy(cls) for cls in SECTIONS.values())))
def test_generated_avmm_sections_are_written_as_construct_builds_them(value: Any) -> None:
    _same_bytes(value)


@pytest.mark.parametrize("value", [
    Point(70000, 0), Point(-1, 0), Point(1, 1 << 63), Point(True, 0),  # type: ignore[arg-type]
    Point(1, "2"),  # type: ignore[arg-type]
    dataclasses.replace(SAMPLE, enabled=1),
    dataclasses.replace(SAMPLE, blob="text"),
    dataclasses.replace(SAMPLE, points=[Point(1, 2), (1, 2)]),
    dataclasses.replace(SAMPLE, table={"a": 1 << 16}),
    dataclasses.replace(SAMPLE, by_id={True: Point(1, 1)}),
    dataclasses.replace(SAMPLE, maybe=Sample),
    dataclasses.replace(SAMPLE, nested=[[1], 2]),
])
def test_a_value_that_does_not_fit_is_refused_with_to_plains_message(value: Any) -> None:
    """The fast path hands what it cannot vouch for to to_plain: same TypeError, and
    nothing half-written."""
    with pytest.raises(TypeError) as reference:
        to_plain(value)
    with pytest.raises(TypeError) as caught:
        encode(value)
    assert str(caught.value) == str(reference.value)
