"""Every legacy device follows one state convention (see avmm/devices/_state.py): a frozen,
slotted dataclass of plain values named after the device, versioned by the class attribute
STATE_VERSION, produced by save_state() and checked by restore_state()."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any, ClassVar, get_type_hints

import pytest

import avmm.devices
from avmm.arch.x86.acpi import S5_SLEEP_TYPE
from avmm.devices import (
    I8042,
    AcpiSleep,
    BootTimer,
    DebugExit,
    DeviceStateError,
    Serial8250,
)
from avmm.errors import AvmmError

FACTORIES: dict[str, Callable[[], Any]] = {
    "Serial8250": lambda: Serial8250(raise_irq=lambda: None, output=lambda _: None),
    "I8042": lambda: I8042(on_reset=lambda: None),
    "AcpiSleep": lambda: AcpiSleep(soft_off_type=S5_SLEEP_TYPE, on_poweroff=lambda: None),
    "BootTimer": lambda: BootTimer(on_marker=lambda: None),
    "DebugExit": lambda: DebugExit(on_exit=lambda _: None),
}
PLAIN_TYPES = {int, bool, bytes}


def _bus_devices() -> list[str]:
    """The device classes avmm.devices exports (anything with read and write)."""
    return sorted(
        name for name, value in vars(avmm.devices).items()
        if inspect.isclass(value) and callable(getattr(value, "read", None))
        and callable(getattr(value, "write", None))
    )


def test_every_exported_device_is_covered_here() -> None:
    assert _bus_devices() == sorted(FACTORIES)


@pytest.fixture(params=sorted(FACTORIES))
def device_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _state_class(name: str) -> type:
    state_class = getattr(avmm.devices, f"{name}State")
    assert dataclasses.is_dataclass(state_class) and isinstance(state_class, type)
    return state_class


def test_state_class_is_frozen_slotted_plain_and_versioned(device_name: str) -> None:
    state_class = _state_class(device_name)
    params = state_class.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen
    assert "__slots__" in vars(state_class)
    version = vars(state_class)["STATE_VERSION"]
    assert type(version) is int and version >= 1
    hints = get_type_hints(state_class)
    assert hints["STATE_VERSION"] == ClassVar[int]
    fields = dataclasses.fields(state_class)
    assert "STATE_VERSION" not in {field.name for field in fields}
    for field in fields:
        assert hints[field.name] in PLAIN_TYPES, field.name


def test_save_state_is_plain_data_that_survives_json(device_name: str) -> None:
    device = FACTORIES[device_name]()
    state = device.save_state()
    state_class = _state_class(device_name)
    assert type(state) is state_class
    plain = dataclasses.asdict(state)
    assert all(type(value) in PLAIN_TYPES for value in plain.values())
    text = json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in plain.items()})
    loaded = {k: bytes.fromhex(v) if isinstance(plain[k], bytes) else v
              for k, v in json.loads(text).items()}
    rebuilt = state_class(**loaded)
    assert rebuilt == state
    fresh = FACTORIES[device_name]()
    fresh.restore_state(rebuilt)
    assert fresh.save_state() == state
    for field in dataclasses.fields(state):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(state, field.name, getattr(state, field.name))


def test_restore_refuses_another_class_and_another_version(device_name: str) -> None:
    device = FACTORIES[device_name]()
    state_class = _state_class(device_name)
    other_name = next(name for name in sorted(FACTORIES) if name != device_name)
    other = FACTORIES[other_name]().save_state()
    newer = dataclasses.make_dataclass(
        f"Newer{state_class.__name__}", [("STATE_VERSION", ClassVar[int],
                                          state_class.STATE_VERSION + 1)],  # type: ignore[attr-defined]
        bases=(state_class,), frozen=True, slots=True,
    )
    current = device.save_state()
    newer_state = newer(**dataclasses.asdict(current))
    for bad, pattern in ((other, "expected "), (newer_state, "version"), (None, "expected ")):
        with pytest.raises(DeviceStateError, match=pattern) as error:
            device.restore_state(bad)
        assert isinstance(error.value, AvmmError)
        assert "\n" not in str(error.value) and " state: " in str(error.value)
    assert device.save_state() == current
