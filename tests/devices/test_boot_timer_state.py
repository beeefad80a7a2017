"""Snapshot state of the boot-time marker port: whether the marker was seen. Host-side
only (reads are zeros either way), saved so that a restored guest writing the marker
again is not reported as a second boot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.devices import BootTimer, BootTimerState, DeviceStateError
from avmm.devices.boot_timer import BOOT_MARKER

MARKER = bytes([BOOT_MARKER])


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.device = BootTimer(on_marker=lambda: self.events.append(("marker",)))

    def run(self, ops: list[tuple[str, bytes | int]]) -> list[list[tuple[object, ...]]]:
        trace = []
        for kind, arg in ops:
            start = len(self.events)
            if kind == "read":
                assert isinstance(arg, int)
                self.events.append(("read", self.device.read(0, arg)))
            else:
                assert isinstance(arg, bytes)
                self.device.write(0, arg)
            trace.append(self.events[start:])
        return trace


OPS = st.one_of(
    st.tuples(st.just("read"), st.sampled_from([1, 2])),
    st.tuples(st.just("write"), st.one_of(st.just(MARKER), st.binary(min_size=1, max_size=2))),
)


@settings(max_examples=100, deadline=None)
@given(history=st.lists(OPS, max_size=10), continuation=st.lists(OPS, max_size=10))
def test_restored_timer_continues_like_the_original(
    history: list[tuple[str, bytes | int]], continuation: list[tuple[str, bytes | int]]
) -> None:
    original = Recorder()
    original.run(history)
    state = original.device.save_state()
    assert state.marker_seen == (("write", MARKER) in history)
    restored = Recorder()
    restored.device.restore_state(state)
    assert restored.events == []  # restoring never reports the boot again
    assert restored.run(continuation) == original.run(continuation)
    assert restored.device.save_state() == original.device.save_state()


def test_marker_seen_before_the_snapshot_is_not_reported_again() -> None:
    original = Recorder()
    original.run([("write", MARKER)])
    assert original.events == [("marker",)]
    restored = Recorder()
    restored.device.restore_state(original.device.save_state())
    restored.run([("write", MARKER)])
    assert restored.events == []
    assert restored.device.reached


def test_marker_not_seen_yet_is_reported_after_restore() -> None:
    restored = Recorder()
    restored.device.restore_state(BootTimer(on_marker=lambda: None).save_state())
    restored.run([("write", MARKER), ("write", MARKER)])
    assert restored.events == [("marker",)]


@pytest.mark.parametrize("bad", [BootTimerState(marker_seen=1),  # type: ignore[arg-type]
                                 BootTimerState(marker_seen=None)])  # type: ignore[arg-type]
def test_restore_refuses_a_non_bool(bad: BootTimerState) -> None:
    device = BootTimer(on_marker=lambda: None)
    with pytest.raises(DeviceStateError, match="boot-timer state: marker_seen="):
        device.restore_state(bad)
    assert not device.reached
