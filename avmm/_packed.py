"""Fixed-size little-endian C structs for the boot path (and virtio-blk's config
space), each compiled once into a :class:`struct.Struct`.

Why not construct, the project's default for binary formats (STYLE.md, convention 7):
every structure here (ELF and bzImage headers, the zero page, ACPI tables) is parsed or
built on ``avmm up``'s way to the guest's first serial byte, and importing construct
(which imports pdb and its friends) cost about 1.9 MiB of RSS and 10 ms of start-up
there. These formats are all fixed-size records of integers and byte strings, which
:mod:`struct` states as plainly. A declaration keeps construct's shape: the spec's field
names in order, each with a struct format code (always little-endian, no implicit
alignment), a nested :class:`Packed`, or an array of one::

    GenericAddress = Packed(("space_id", "B"), ("bit_width", "B"), ..., ("address", "Q"))

A name of ``""`` is padding (``"4x"``). Variable-length formats (ELF notes, AML) are
parsed by hand next to their declarations.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

#: What a field is: an integer or byte string (one struct code), padding, a nested
#: struct, or an array of nested structs.
_VALUE, _PAD, _NESTED, _ARRAY = range(4)
#: Names a field may not have: :class:`Fields` is a dict, whose methods would win.
_RESERVED: Final = frozenset(name for name in dir(dict) if not name.startswith("__"))


class Fields(dict[str, Any]):
    """Parsed fields by name, also readable as attributes (``header.version``), as
    construct's ``Container`` was."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Packed:
    """A C struct of fixed size: ``fields`` are ``(name, code)``, ``(name, code,
    default)``, ``(name, Packed)`` or ``(name, Packed, count)``; ``code`` is one struct
    format item (``"B"``, ``"H"``, ``"I"``, ``"Q"``, ``"6s"``, or ``"4x"`` for padding
    with the name ``""``)."""

    __slots__ = ("_plan", "names", "size", "struct")

    def __init__(self, *fields: tuple[Any, ...]) -> None:
        codes: list[str] = []
        plan: list[tuple[str, int, Any, Any]] = []
        for name, kind, *rest in fields:
            if name in _RESERVED:
                raise ValueError(f"field name {name!r} would hide a dict method")
            if isinstance(kind, Packed):
                count = rest[0] if rest else None
                codes.append(kind.struct.format[1:] * (count or 1))
                plan.append((name, _NESTED if count is None else _ARRAY, kind, count))
            elif not name:
                codes.append(kind)
                plan.append((name, _PAD, None, None))
            else:
                zero = bytes(struct.calcsize(kind)) if kind.endswith("s") else 0
                default = rest[0] if rest else zero
                codes.append(kind)
                plan.append((name, _VALUE, kind, default))
        self.struct: Final = struct.Struct("<" + "".join(codes))
        self.size: Final = self.struct.size
        self.names: Final = tuple(name for name, what, _, _ in plan if what != _PAD)
        self._plan: Final = tuple(plan)

    def sizeof(self) -> int:
        return self.size

    def parse(self, data: bytes | bytearray | memoryview, offset: int = 0) -> Fields:
        """The fields of the ``size`` bytes at ``offset`` in ``data`` (more may follow).

        :raises struct.error: ``data`` is too short; callers check lengths first."""
        values = self.struct.unpack_from(data, offset)
        fields, _ = self._group(values, 0)
        return fields

    def _group(self, values: tuple[Any, ...], index: int) -> tuple[Fields, int]:
        fields = Fields()
        for name, what, kind, count in self._plan:
            if what == _VALUE:
                fields[name] = values[index]
                index += 1
            elif what == _NESTED:
                fields[name], index = kind._group(values, index)
            elif what == _ARRAY:
                items = []
                for _ in range(count):
                    item, index = kind._group(values, index)
                    items.append(item)
                fields[name] = items
        return fields, index

    def build(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> bytes:
        """The bytes of ``values`` (a mapping, keywords, or both). A field left out is
        its default: zero, zero bytes, or the value its declaration gives.

        :raises ValueError: a byte string is not exactly its field's size.
        :raises struct.error: an integer does not fit its field."""
        flat: list[Any] = []
        self._flatten({**(values or {}), **more}, flat)
        return self.struct.pack(*flat)

    def _flatten(self, values: Mapping[str, Any], flat: list[Any]) -> None:
        for name, what, kind, extra in self._plan:
            if what == _VALUE:
                value = values.get(name, extra)
                if isinstance(value, bytes | bytearray) and len(value) != len(extra):
                    raise ValueError(f"{name}: {len(value)} bytes for a {len(extra)}-byte field")
                flat.append(value)
            elif what == _NESTED:
                kind._flatten(values.get(name) or {}, flat)
            elif what == _ARRAY:
                items = list(values.get(name) or ())
                if len(items) > extra:
                    raise ValueError(f"{name}: {len(items)} items for {extra} slots")
                for item in items + [{}] * (extra - len(items)):
                    kind._flatten(item, flat)

