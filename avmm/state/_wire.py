"""The wire form of :mod:`.codec` as one recursive construct declaration, :data:`VALUE`.

It defines the encoding: :mod:`._writer` and :mod:`._reader` write and read the same
bytes faster and are tested against it. Kept apart from :mod:`.codec`, which re-exports
these names on first use, so that importing the state classes does not import construct
(see the note there).
"""

from __future__ import annotations

from typing import Any

import construct as c

from .codec import _VARINT_MAX_BYTES


class _BoundedVarInt(c.Construct):  # type: ignore[misc]
    """An unsigned LEB128 varint of at most :data:`_VARINT_MAX_BYTES` bytes, in its
    shortest form (so that every value has exactly one encoding)."""

    def _parse(self, stream: Any, context: Any, path: str) -> int:
        value = 0
        for position in range(_VARINT_MAX_BYTES):
            byte = c.stream_read(stream, 1, path)[0]
            value |= (byte & 0x7F) << (7 * position)
            if not byte & 0x80:
                if byte == 0 and position:
                    raise c.IntegerError("varint is not in its shortest form", path=path)
                return value
        raise c.IntegerError(f"varint longer than {_VARINT_MAX_BYTES} bytes", path=path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> int:
        if not isinstance(obj, int) or obj < 0 or obj >= 1 << (7 * _VARINT_MAX_BYTES):
            raise c.IntegerError(f"varint cannot hold {obj!r}", path=path)
        out = bytearray()
        value = obj
        while True:
            low = value & 0x7F
            value >>= 7
            if value:
                out.append(low | 0x80)
            else:
                out.append(low)
                break
        c.stream_write(stream, bytes(out), len(out), path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise c.SizeofError("a varint has no fixed size", path=path)


VAR_UINT = _BoundedVarInt()
#: Signed integers in zigzag form (0, -1, 1, -2, ... → 0, 1, 2, 3, ...).
VAR_INT = c.ExprAdapter(
    VAR_UINT,
    decoder=lambda value, ctx: (value >> 1) if not value & 1 else -(value >> 1) - 1,
    encoder=lambda value, ctx: value << 1 if value >= 0 else ((-value - 1) << 1) | 1,
)
NAME = c.PascalString(VAR_UINT, "utf8")

TAG = c.Enum(c.Int8ub, none=0, false=1, true=2, int=3, bytes=4, str=5, list=6, record=7,
             map=8)

class _UnknownTag(c.Construct):  # type: ignore[misc]
    def _parse(self, stream: Any, context: Any, path: str) -> None:
        raise c.ExplicitError(f"unknown value tag {int(context.tag)}", path=path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        raise c.ExplicitError(f"unknown value tag {context.tag!r}", path=path)


_LAZY_VALUE = c.LazyBound(lambda: VALUE)

#: One value: a tag and its body; records, lists and maps contain values.
VALUE = c.Struct(
    "tag" / TAG,
    "value" / c.Switch(c.this.tag, {
        "none": c.Pass,
        "false": c.Pass,
        "true": c.Pass,
        "int": VAR_INT,
        "bytes": c.Prefixed(VAR_UINT, c.GreedyBytes),
        "str": NAME,
        "list": c.PrefixedArray(VAR_UINT, _LAZY_VALUE),
        "record": c.Struct(
            "name" / NAME,
            "version" / VAR_UINT,
            "fields" / c.PrefixedArray(VAR_UINT, c.Struct("name" / NAME, "value" / _LAZY_VALUE)),
        ),
        "map": c.PrefixedArray(VAR_UINT, c.Struct("key" / _LAZY_VALUE, "value" / _LAZY_VALUE)),
    }, default=_UnknownTag()),
)
