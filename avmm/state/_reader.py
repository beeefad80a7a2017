"""A direct reader of :data:`avmm.state.codec.VALUE`, for restore latency.

The construct declaration in :mod:`.codec` defines the encoding and builds it; parsing a
vCPU's state through it costs some 20 ms, most of a restore's time. This reader walks
the same bytes straight into plain values (about ten times faster) and enforces the same
rules: bounded varints in their shortest form, strict UTF-8, known tags, no repeated
field or key, nothing after the end. tests/state/test_codec.py checks on damaged inputs
that it accepts and refuses exactly what the construct declaration does.
"""

from __future__ import annotations

from typing import Any

from ._errors import SnapshotError
from .codec import _VARINT_MAX_BYTES, Record

#: Far deeper than any state nests (a vCPU's segment registers are four levels down).
MAX_DEPTH = 64

_NONE, _FALSE, _TRUE, _INT, _BYTES, _STR, _LIST, _RECORD, _MAP = range(9)


class _Malformed(Exception):
    """Bytes that are not a VALUE; becomes ``SnapshotError("<path>: malformed (...)")``."""


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def take(self, count: int) -> bytes:
        start = self.pos
        if count > self.end - start:
            raise _Malformed(f"stream read less than specified amount, expected {count}, "
                             f"found {self.end - start}")
        self.pos = start + count
        return self.data[start:self.pos]

    def varint(self) -> int:
        data, pos, end = self.data, self.pos, self.end
        value = 0
        for position in range(_VARINT_MAX_BYTES):
            if pos >= end:
                raise _Malformed("stream read less than specified amount, expected 1, found 0")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << (7 * position)
            if not byte & 0x80:
                if byte == 0 and position:
                    raise _Malformed("varint is not in its shortest form")
                self.pos = pos
                return value
        raise _Malformed(f"varint longer than {_VARINT_MAX_BYTES} bytes")

    def text(self) -> str:
        raw = self.take(self.varint())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"cannot use encoding 'utf8' to decode {raw[:40]!r}") from None

    def value(self, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SnapshotError(f"{path}: values are nested too deeply")
        tag = self.take(1)[0]
        if tag == _INT:
            value = self.varint()
            return (value >> 1) if not value & 1 else -(value >> 1) - 1
        if tag == _BYTES:
            return self.take(self.varint())
        if tag == _RECORD:
            name = self.text()
            version = self.varint()
            fields: dict[str, Any] = {}
            for _ in range(self.varint()):
                field = self.text()
                if field in fields:
                    raise SnapshotError(f"{path}: field {field!r} appears twice")
                fields[field] = self.value(f"{path}.{field}", depth + 1)
            return Record(name, version, fields)
        if tag == _LIST:
            return [self.value(f"{path}[{i}]", depth + 1) for i in range(self.varint())]
        if tag == _STR:
            return self.text()
        if tag == _NONE:
            return None
        if tag in (_FALSE, _TRUE):
            return tag == _TRUE
        if tag == _MAP:
            result: dict[Any, Any] = {}
            for _ in range(self.varint()):
                key = self.value(f"{path}{{key}}", depth + 1)
                if not isinstance(key, int | str) or isinstance(key, bool):
                    raise SnapshotError(f"{path}: a map key must be an integer or a string")
                if key in result:
                    raise SnapshotError(f"{path}: key {key!r} appears twice")
                result[key] = self.value(f"{path}[{key!r}]", depth + 1)
            return result
        raise _Malformed(f"unknown value tag {tag}")


def read_values(data: bytes, count_prefixed: bool, path: str) -> Any:
    """One VALUE filling ``data`` (``count_prefixed`` False), or a varint count of
    ``(name, VALUE)`` sections filling it (True: the state file's payload), as plain
    values; :class:`SnapshotError` for anything else."""
    reader = _Reader(data)
    try:
        if count_prefixed:
            result: Any = []
            for _ in range(reader.varint()):
                name = reader.text()
                result.append((name, reader.value(name, 0)))
        else:
            result = reader.value(path, 0)
        if reader.pos != reader.end:
            raise _Malformed("expected end of stream")
    except _Malformed as e:
        raise SnapshotError(f"{path}: malformed ({e})") from None
    return result
