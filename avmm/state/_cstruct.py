"""Copying between a KVM struct (a cffi object) and a state dataclass that mirrors it.

The dataclasses in this package name their fields as ``<linux/kvm.h>`` names the
struct's members, so one generic walk fills either side: nested structs become nested
dataclasses, fixed arrays become lists (of ints or of dataclasses). Nothing here imports
cffi: a cdata struct is read with ``getattr`` and its arrays with ``len``/indexing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, get_args, get_origin

from ._errors import SnapshotError
from .codec import field_hints, split_annotated

T = TypeVar("T")


def from_c(cls: type[T], cdata: Any) -> T:
    """A ``cls`` holding the values of the same-named members of ``cdata``."""
    values: dict[str, Any] = {}
    for name, hint in field_hints(cls):
        values[name] = _value_from_c(hint, getattr(cdata, name))
    return cls(**values)


def _value_from_c(hint: Any, value: Any) -> Any:
    hint, _ = split_annotated(hint)
    if get_origin(hint) is list:
        (item_hint,) = get_args(hint)
        return [_value_from_c(item_hint, value[i]) for i in range(len(value))]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_c(hint, value)
    return int(value)


def to_c(state: Any, cdata: Any, path: str = "") -> None:
    """Write every field of ``state`` into the same-named member of ``cdata``. A list
    must have exactly the array's length, a value must fit its member: anything else is
    a :class:`SnapshotError` naming the field (a state from a host with other struct
    sizes, or a forged one)."""
    where = path or type(state).__name__
    for name, hint in field_hints(type(state)):
        value = getattr(state, name)
        base, _ = split_annotated(hint)
        if get_origin(base) is list:
            target = getattr(cdata, name)
            if len(value) != len(target):
                raise SnapshotError(f"{where}.{name}: has {len(value)} entries; KVM's struct "
                                    f"has {len(target)}")
            (item_hint,) = get_args(base)
            item_base, _ = split_annotated(item_hint)
            for i, item in enumerate(value):
                if isinstance(item_base, type) and dataclasses.is_dataclass(item_base):
                    to_c(item, target[i], f"{where}.{name}[{i}]")
                else:
                    _store(target, i, item, f"{where}.{name}[{i}]")
        elif isinstance(base, type) and dataclasses.is_dataclass(base):
            to_c(value, getattr(cdata, name), f"{where}.{name}")
        else:
            try:
                setattr(cdata, name, value)
            except (OverflowError, TypeError) as e:
                raise SnapshotError(f"{where}.{name}: {value!r} does not fit ({e})") from None


def _store(array: Any, index: int, value: Any, where: str) -> None:
    try:
        array[index] = value
    except (OverflowError, TypeError) as e:
        raise SnapshotError(f"{where}: {value!r} does not fit ({e})") from None
