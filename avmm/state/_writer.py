"""A direct writer of :data:`avmm.state.codec.VALUE`, for the migration's downtime.

The construct declaration in :mod:`.codec` defines the encoding; building a VM's state
through it costs some 15 ms, most of a migration's stop-and-copy. This writer appends
the same bytes to a ``bytearray`` (some ten times faster): tests/state/test_writer.py
checks it byte for byte against the construct declaration, on real states and on
generated values.

Two entry points:

* :func:`write_plain`: a plain value (:class:`~.codec.Record`, lists, dicts, ints, ...)
  as ``VALUE.build(wire_of(plain))`` would write it.
* :func:`encode_state`: a state object straight to bytes, as
  ``write_plain(to_plain(value))`` would, with a plan compiled once per declared type
  instead of walking the type hints on every call. It takes the fast path only where
  it is sure to give the same bytes; anything else (a value that does not fit its
  declaration, a type it has no plan for) goes through :func:`~.codec.to_plain`, which
  gives the same bytes or raises the same ``TypeError`` it always did.

The writer is on the trusted side (avmm's own state); what reads bytes back is
:mod:`._reader`, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, get_args, get_origin

import construct as c

from .codec import (
    _ANY_INT,
    _VARINT_MAX_BYTES,
    Record,
    _optional_of,
    field_hints,
    split_annotated,
    state_name,
    state_version,
    to_plain,
)

_NONE, _FALSE, _TRUE, _INT, _BYTES, _STR, _LIST, _RECORD, _MAP = range(9)
_VARINT_LIMIT = 1 << (7 * _VARINT_MAX_BYTES)

Encoder = Callable[[bytearray, Any], None]


def _varint(out: bytearray, value: int) -> None:
    """Append ``value`` (0 <= value < 2**70, checked by the caller) in LEB128."""
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _uvarint(out: bytearray, value: int) -> None:
    """:func:`_varint` of a value not known to fit (construct's check and error)."""
    if not isinstance(value, int) or value < 0 or value >= _VARINT_LIMIT:
        raise c.IntegerError(f"varint cannot hold {value!r}")
    _varint(out, value)


def _zigzag(value: int) -> int:
    return value << 1 if value >= 0 else ((-value - 1) << 1) | 1


@functools.lru_cache(maxsize=4096)
def text_bytes(text: str) -> bytes:
    """A name as :data:`~.codec.NAME` writes it (names repeat: field and record names)."""
    raw = text.encode("utf-8")
    out = bytearray()
    _varint(out, len(raw))
    return bytes(out + raw)


def _write_text(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    _varint(out, len(raw))
    out += raw


# -- plain values ----------------------------------------------------------------------


def write_plain(out: bytearray, plain: Any) -> None:
    """Append ``plain`` as ``VALUE.build(wire_of(plain))`` writes it."""
    if plain is None:
        out.append(_NONE)
    elif plain is True:
        out.append(_TRUE)
    elif plain is False:
        out.append(_FALSE)
    elif isinstance(plain, int):
        out.append(_INT)
        _uvarint(out, _zigzag(plain))
    elif isinstance(plain, bytes):
        out.append(_BYTES)
        _varint(out, len(plain))
        out += plain
    elif isinstance(plain, str):
        out.append(_STR)
        _write_text(out, plain)
    elif isinstance(plain, list):
        out.append(_LIST)
        _varint(out, len(plain))
        for item in plain:
            write_plain(out, item)
    elif isinstance(plain, Record):
        out.append(_RECORD)
        _write_text(out, plain.name)
        _uvarint(out, plain.version)
        _varint(out, len(plain.fields))
        for name, value in plain.fields.items():
            _write_text(out, name)
            write_plain(out, value)
    elif isinstance(plain, dict):
        out.append(_MAP)
        _varint(out, len(plain))
        for key, value in plain.items():
            write_plain(out, key)
            write_plain(out, value)
    else:
        raise TypeError(f"cannot encode {type(plain).__name__}")


def build_plain(plain: Any) -> bytes:
    out = bytearray()
    write_plain(out, plain)
    return bytes(out)


# -- state objects, by a plan per declared type ----------------------------------------


class _Slow(Exception):
    """The fast path cannot vouch for this value: take :func:`to_plain`'s."""


def encode_state(value: Any, hint: Any = None) -> bytes:
    """The bytes of ``write_plain(to_plain(value, hint))``."""
    out = bytearray()
    write_state(out, value, hint)
    return bytes(out)


def write_state(out: bytearray, value: Any, hint: Any = None) -> None:
    """Append what :func:`encode_state` returns."""
    start = len(out)
    try:
        _encoder(type(value) if hint is None else hint)(out, value)
    except (_Slow, TypeError):
        # A value the plan leaves to the reference path, an unhashable hint (no plan can
        # be cached for it), or a value the plan did not expect: the reference path
        # decides (the same bytes, or its TypeError).
        del out[start:]
        write_plain(out, to_plain(value, hint))


def _encoder(hint: Any) -> Encoder:
    try:
        return _ENCODERS[hint]
    except KeyError:
        pass
    encoder = _ENCODERS[hint] = _compile(hint)
    return encoder


_ENCODERS: dict[Any, Encoder] = {}


def _slow(out: bytearray, value: Any) -> None:
    raise _Slow


def _compile(hint: Any) -> Encoder:
    """The encoder of values declared ``hint``: the checks of :func:`to_plain`, in its
    order, then the bytes; :class:`_Slow` wherever to_plain would raise."""
    base, int_range = split_annotated(hint)
    try:
        inner = _optional_of(base)
    except TypeError:
        return _slow  # a union to_plain refuses: it says so
    if inner is not None:
        inner_encoder = _encoder(inner)

        def optional(out: bytearray, value: Any) -> None:
            if value is None:
                out.append(_NONE)
            else:
                inner_encoder(out, value)
        return optional
    if base is bool:
        def boolean(out: bytearray, value: Any) -> None:
            if value is True:
                out.append(_TRUE)
            elif value is False:
                out.append(_FALSE)
            else:
                raise _Slow
        return boolean
    if base is int:
        allowed = int_range or _ANY_INT
        low, high = allowed.low, allowed.high

        def integer(out: bytearray, value: Any) -> None:
            if value.__class__ is not int and (not isinstance(value, int)
                                               or isinstance(value, bool)):
                raise _Slow
            if not low <= value <= high:
                raise _Slow
            out.append(_INT)
            zigzag = value << 1 if value >= 0 else ((-value - 1) << 1) | 1
            if zigzag <= 0x7F:
                out.append(zigzag)
            else:
                _varint(out, zigzag)
        return integer
    if base is bytes:
        def blob(out: bytearray, value: Any) -> None:
            if value.__class__ is not bytes:
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise _Slow
                value = bytes(value)
            out.append(_BYTES)
            _varint(out, len(value))
            out += value
        return blob
    if base is str:
        def string(out: bytearray, value: Any) -> None:
            if not isinstance(value, str):
                raise _Slow
            out.append(_STR)
            _write_text(out, value)
        return string
    origin = get_origin(base)
    if origin is list:
        (item_hint,) = get_args(base)
        item_encoder = _encoder(item_hint)

        def sequence(out: bytearray, value: Any) -> None:
            if not isinstance(value, list | tuple):
                raise _Slow
            out.append(_LIST)
            _varint(out, len(value))
            for item in value:
                item_encoder(out, item)
        return sequence
    if origin is dict:
        key_hint, value_hint = get_args(base)
        if split_annotated(key_hint)[0] not in (int, str):
            return _slow  # keys to_plain turns into something else: let it
        key_encoder, value_encoder = _encoder(key_hint), _encoder(value_hint)

        def mapping(out: bytearray, value: Any) -> None:
            if not isinstance(value, dict):
                raise _Slow
            out.append(_MAP)
            _varint(out, len(value))
            for key, item in value.items():
                key_encoder(out, key)
                value_encoder(out, item)
        return mapping
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return _record_encoder(base)
    return _slow


def _record_encoder(cls: type) -> Encoder:
    """The encoder of a dataclass: its fixed head (tag, name, version, field count) in
    one append, then each field's name and value. The fields' encoders are made on the
    first call (a dataclass may contain itself)."""
    head = bytearray([_RECORD])
    head += text_bytes(state_name(cls))
    _uvarint(head, state_version(cls))
    hints = field_hints(cls)
    _varint(head, len(hints))
    head_bytes = bytes(head)
    plan: tuple[tuple[bytes, str, Encoder], ...] | None = None

    def record(out: bytearray, value: Any) -> None:
        nonlocal plan
        if not isinstance(value, cls):
            raise _Slow
        if plan is None:
            # Made whole, then set in one step: threads may encode at the same time.
            plan = tuple((text_bytes(name), name, _encoder(hint)) for name, hint in hints)
        out += head_bytes
        for name_bytes, name, encoder in plan:
            out += name_bytes
            encoder(out, getattr(value, name))
    return record
