"""Copying between a KVM struct (a cffi object) and a state dataclass that mirrors it.

The dataclasses in this package name their fields as ``<linux/kvm.h>`` names the
struct's members, so one generic walk fills either side: nested structs become nested
dataclasses, fixed arrays become lists (of ints or of dataclasses). Nothing here imports
cffi: a cdata struct is read with ``getattr`` and its arrays with ``len``/indexing.

The walk is planned once per dataclass (:func:`_plan`: what each field is, from its
type hints), not worked out from the hints on every copy: a vCPU's save and restore
copy some 250 fields, on a migration's downtime.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, get_args, get_origin

from ._errors import SnapshotError
from .codec import field_hints, split_annotated

T = TypeVar("T")

#: What a field is: an integer, a nested struct, an array of integers, an array of
#: structs, or anything else (walked by the generic code, as before plans).
_INT, _RECORD, _INTS, _RECORDS, _OTHER = range(5)

_PLANS: dict[type, tuple[tuple[str, int, Any], ...]] = {}


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _plan(cls: type) -> tuple[tuple[str, int, Any], ...]:
    """``(field name, kind, the dataclass of a nested struct or array item, or the
    field's hint for _OTHER)`` for each field of ``cls``."""
    plan = _PLANS.get(cls)
    if plan is not None:
        return plan
    fields = []
    for name, hint in field_hints(cls):
        base, _ = split_annotated(hint)
        if get_origin(base) is list:
            (item_hint,) = get_args(base)
            item_base, _ = split_annotated(item_hint)
            if _is_record(item_base):
                fields.append((name, _RECORDS, item_base))
            elif get_origin(item_base) is None:
                fields.append((name, _INTS, None))
            else:
                fields.append((name, _OTHER, hint))
        elif _is_record(base):
            fields.append((name, _RECORD, base))
        elif get_origin(base) is None:
            fields.append((name, _INT, None))
        else:
            fields.append((name, _OTHER, hint))
    plan = _PLANS[cls] = tuple(fields)
    return plan


def from_c(cls: type[T], cdata: Any) -> T:
    """A ``cls`` holding the values of the same-named members of ``cdata``."""
    values: dict[str, Any] = {}
    for name, kind, sub in _plan(cls):
        value = getattr(cdata, name)
        if kind == _INT:
            values[name] = int(value)
        elif kind == _INTS:
            values[name] = [int(item) for item in value]
        elif kind == _RECORD:
            values[name] = from_c(sub, value)
        elif kind == _RECORDS:
            values[name] = [from_c(sub, value[i]) for i in range(len(value))]
        else:
            values[name] = _value_from_c(sub, value)
    return cls(**values)


def _value_from_c(hint: Any, value: Any) -> Any:
    hint, _ = split_annotated(hint)
    if get_origin(hint) is list:
        (item_hint,) = get_args(hint)
        return [_value_from_c(item_hint, value[i]) for i in range(len(value))]
    if _is_record(hint):
        return from_c(hint, value)
    return int(value)


def to_c(state: Any, cdata: Any, path: str = "") -> None:
    """Write every field of ``state`` into the same-named member of ``cdata``. A list
    must have exactly the array's length, a value must fit its member: anything else is
    a :class:`SnapshotError` naming the field (a state from a host with other struct
    sizes, or a forged one)."""
    try:
        _to_c_fast(state, cdata)
    except Exception:
        # The checked walk writes the same values again and names what does not fit.
        _to_c_checked(state, cdata, path)


def _to_c_fast(state: Any, cdata: Any) -> None:
    """:func:`_to_c_checked` without the paths: any error is handed to it."""
    for name, kind, sub in _plan(type(state)):
        value = getattr(state, name)
        if kind == _INT:
            setattr(cdata, name, value)
        elif kind == _RECORD:
            _to_c_fast(value, getattr(cdata, name))
        elif kind in (_INTS, _RECORDS):
            target = getattr(cdata, name)
            if len(value) != len(target):
                raise SnapshotError("length")  # the checked walk says which
            if kind == _INTS:
                for i, item in enumerate(value):
                    target[i] = item
            else:
                for i, item in enumerate(value):
                    if not isinstance(item, sub):
                        raise TypeError("item")
                    _to_c_fast(item, target[i])
        else:
            raise TypeError("not planned")


def _to_c_checked(state: Any, cdata: Any, path: str = "") -> None:
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
                if _is_record(item_base):
                    _to_c_checked(item, target[i], f"{where}.{name}[{i}]")
                else:
                    _store(target, i, item, f"{where}.{name}[{i}]")
        elif _is_record(base):
            _to_c_checked(value, getattr(cdata, name), f"{where}.{name}")
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
