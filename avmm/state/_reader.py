"""A direct reader of :data:`avmm.state.codec.VALUE`, for restore latency.

The construct declaration in :mod:`.codec` defines the encoding and builds it; parsing a
vCPU's state through it costs some 20 ms, most of a restore's time. This reader walks
the same bytes straight into plain values (about ten times faster) and enforces the same
rules: bounded varints in their shortest form, strict UTF-8, known tags, no repeated
field or key, nothing after the end. tests/state/test_codec.py checks on damaged inputs
that it accepts and refuses exactly what the construct declaration does.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ._errors import SnapshotError
from .codec import _VARINT_MAX_BYTES, Record

#: Far deeper than any state nests (a vCPU's segment registers are four levels down).
MAX_DEPTH = 64
#: The most items in one list or map, or fields in one record: the longest lists of a
#: real state are a vCPU's MSRs and CPUID entries (some dozens to hundreds; KVM lists
#: at most a few thousand MSRs), a virtio device's queues (at most 1024).
MAX_ITEMS = 16384
#: The most values in a whole state file. A vCPU is about a thousand (CPUID entries and
#: MSRs are records), so this holds avmm's 255 vCPUs twice over. Every value is a Python
#: object (~180 bytes for a small record): the cap bounds what parsing allocates to
#: some 100 MiB whatever the file holds, where a file of tiny values would otherwise
#: cost ~50 times its size.
MAX_VALUES = 1 << 19

_NONE, _FALSE, _TRUE, _INT, _BYTES, _STR, _LIST, _RECORD, _MAP = range(9)


class _Malformed(Exception):
    """Bytes that are not a VALUE; becomes ``SnapshotError("<path>: malformed (...)")``."""


class _Reader:
    __slots__ = ("budget", "data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.budget = MAX_VALUES

    def count(self, path: str, what: str) -> int:
        """A list's, map's or record's item count, refused before anything is allocated
        if it is more than :data:`MAX_ITEMS` or than the values left in the budget."""
        count = self.varint()
        if count > MAX_ITEMS:
            raise SnapshotError(f"{path}: {count} {what}; a state holds at most {MAX_ITEMS}")
        if count > self.budget:
            raise SnapshotError(f"{path}: too many values (a state holds at most "
                                f"{MAX_VALUES} in all)")
        return count

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
        self.budget -= 1
        if self.budget < 0:
            raise SnapshotError(f"{path}: too many values (a state holds at most "
                                f"{MAX_VALUES} in all)")
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
            for _ in range(self.count(path, "fields")):
                field = self.text()
                if field in fields:
                    raise SnapshotError(f"{path}: field {field!r} appears twice")
                fields[field] = self.value(f"{path}.{field}", depth + 1)
            return Record(name, version, fields)
        if tag == _LIST:
            return [self.value(f"{path}[{i}]", depth + 1)
                    for i in range(self.count(path, "list items"))]
        if tag == _STR:
            return self.text()
        if tag == _NONE:
            return None
        if tag in (_FALSE, _TRUE):
            return tag == _TRUE
        if tag == _MAP:
            result: dict[Any, Any] = {}
            for _ in range(self.count(path, "map entries")):
                key = self.value(f"{path}{{key}}", depth + 1)
                if not isinstance(key, int | str) or isinstance(key, bool):
                    raise SnapshotError(f"{path}: a map key must be an integer or a string")
                if key in result:
                    raise SnapshotError(f"{path}: key {key!r} appears twice")
                result[key] = self.value(f"{path}[{key!r}]", depth + 1)
            return result
        raise _Malformed(f"unknown value tag {tag}")


class _Refused(Exception):
    """The fast pass met something it does not accept (the checked pass says what)."""


def _read_fast(data: bytes, count_prefixed: bool,
               sections: Collection[str] | None) -> Any:
    """What :func:`_read_checked` returns, in one pass without paths, or
    :class:`_Refused` wherever that would refuse (or anything else goes wrong): the same
    rules — bounded shortest-form varints, strict UTF-8, known tags, the depth, item and
    value limits, no repeated field, key or section, nothing after the end — with the
    common cases (one-byte varints) inline."""
    end = len(data)
    pos = 0
    budget = MAX_VALUES

    def varint() -> int:
        nonlocal pos
        if pos >= end:
            raise _Refused
        byte = data[pos]
        pos += 1
        if byte < 0x80:
            return byte
        value = byte & 0x7F
        for position in range(1, _VARINT_MAX_BYTES):
            if pos >= end:
                raise _Refused
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << (7 * position)
            if not byte & 0x80:
                if byte == 0:
                    raise _Refused  # not the shortest form
                return value
        raise _Refused

    def text() -> str:
        nonlocal pos
        length = varint()
        start = pos
        if length > end - start:
            raise _Refused
        pos = start + length
        return data[start:pos].decode("utf-8")  # UnicodeDecodeError: refused

    def count() -> int:
        items = varint()
        if items > MAX_ITEMS or items > budget:
            raise _Refused
        return items

    def value(depth: int) -> Any:
        nonlocal pos, budget
        if depth > MAX_DEPTH:
            raise _Refused
        budget -= 1
        if budget < 0 or pos >= end:
            raise _Refused
        tag = data[pos]
        pos += 1
        if tag == _INT:
            number = varint()
            return (number >> 1) if not number & 1 else -(number >> 1) - 1
        if tag == _RECORD:
            name = text()
            version = varint()
            fields: dict[str, Any] = {}
            for _ in range(count()):
                field = text()
                if field in fields:
                    raise _Refused
                fields[field] = value(depth + 1)
            return Record(name, version, fields)
        if tag == _BYTES:
            length = varint()
            start = pos
            if length > end - start:
                raise _Refused
            pos = start + length
            return data[start:pos]
        if tag == _LIST:
            return [value(depth + 1) for _ in range(count())]
        if tag == _STR:
            return text()
        if tag == _NONE:
            return None
        if tag in (_FALSE, _TRUE):
            return tag == _TRUE
        if tag == _MAP:
            result: dict[Any, Any] = {}
            for _ in range(count()):
                key = value(depth + 1)
                if key.__class__ is not int and key.__class__ is not str:
                    raise _Refused  # (bool is not int here: refused too)
                if key in result:
                    raise _Refused
                result[key] = value(depth + 1)
            return result
        raise _Refused

    if count_prefixed:
        found: Any = []
        seen: set[str] = set()
        for _ in range(varint()):
            name = text()
            if sections is not None:
                if name not in sections or name in seen:
                    raise _Refused
                seen.add(name)
            found.append((name, value(0)))
    else:
        found = value(0)
    if pos != end:
        raise _Refused
    return found


def read_values(data: bytes, count_prefixed: bool, path: str, *,
                sections: Collection[str] | None = None) -> Any:
    """One VALUE filling ``data`` (``count_prefixed`` False), or a varint count of
    ``(name, VALUE)`` sections filling it (True: the state file's payload), as plain
    values; :class:`SnapshotError` for anything else. With ``sections``, a section of
    another name, or one seen before, is refused before its value is read.

    A fast pass reads what is valid; whatever it refuses is read again by the checked
    pass, which names the path of the first thing wrong (and decides: the fast pass
    never accepts what the checked one refuses)."""
    try:
        return _read_fast(data, count_prefixed, sections)
    except Exception:  # _Refused, a UnicodeDecodeError, a RecursionError, ...
        return _read_checked(data, count_prefixed, path, sections)


def _read_checked(data: bytes, count_prefixed: bool, path: str,
                  sections: Collection[str] | None) -> Any:
    reader = _Reader(data)
    try:
        if count_prefixed:
            result: Any = []
            seen: set[str] = set()
            for _ in range(reader.varint()):
                name = reader.text()
                if sections is not None:
                    if name not in sections:
                        raise SnapshotError(f"unknown section {name!r} (written by a newer "
                                            "avmm?)")
                    if name in seen:
                        raise SnapshotError(f"section {name!r} appears twice")
                    seen.add(name)
                result.append((name, reader.value(name, 0)))
        else:
            result = reader.value(path, 0)
        if reader.pos != reader.end:
            raise _Malformed("expected end of stream")
    except _Malformed as e:
        raise SnapshotError(f"{path}: malformed ({e})") from None
    return result
