"""A strict, self-describing binary encoding of state dataclasses.

State is plain data: dataclasses whose fields are ``int`` (optionally with a width, see
:data:`U8` ... :data:`S64`), ``bool``, ``bytes``, ``str``, ``list[T]``, ``dict[K, V]``
(``K`` an int or str), ``T | None`` and other such dataclasses. Nothing else can be
encoded, so nothing executable or live ever reaches a file.

The wire form is one recursive construct declaration, :data:`VALUE` (in :mod:`._wire`,
imported on first use): a tag byte and the tag's body. A record (a dataclass) carries
its name, its ``STATE_VERSION`` and each field by name. Decoding is two steps:
construct parses the bytes into plain values (:class:`Record`, lists, dicts, ints,
...), then :func:`decode` binds them to the expected dataclass, following its type
hints and refusing anything that does not fit: an unknown or missing field, a wrong
tag, an integer out of its width, a record of another name or a version this avmm does
not read. Every refusal is one :class:`SnapshotError` line with the path of the
offending value (``VcpuState.sregs.cs.limit: ...``).

A dataclass may declare ``STATE_VERSION`` (default 1), ``STATE_NAME`` (default the
class name) and, once its version moves on, a classmethod
``upgrade_state(version, fields) -> fields`` that turns the plain field values of an
older version into the current ones.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin, get_type_hints

from .._lazy import lazy_exports
from ._errors import SnapshotError
from ._widths import ANY_INT as _ANY_INT
from ._widths import S64, U8, U16, U32, U64, IntRange

if TYPE_CHECKING:
    from ._wire import NAME as NAME
    from ._wire import TAG as TAG
    from ._wire import VALUE as VALUE
    from ._wire import VAR_INT as VAR_INT
    from ._wire import VAR_UINT as VAR_UINT

# -- integer widths: in ._widths (light, for every device's state class) ---------------

# -- the wire form (construct) ---------------------------------------------------------

#: A varint longer than this is refused: 10 bytes hold 70 bits, enough for the zigzag
#: form of any 64-bit value. Without a bound a hostile file could make the parser build
#: an integer of millions of digits.
_VARINT_MAX_BYTES = 10

#: The construct declaration of the wire form lives in :mod:`._wire`, imported on first
#: use of one of these names: this module's integer widths are imported by every virtio
#: device and transport on ``avmm up``'s path, which encodes nothing, and construct costs
#: that path about 1.9 MiB of RSS and 10 ms. Encoding and decoding go through
#: :mod:`._writer` and :mod:`._reader`, imported when a snapshot, restore or migration
#: first needs them.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    name: "avmm.state._wire" for name in ("VAR_UINT", "VAR_INT", "NAME", "TAG", "VALUE")
})


# -- plain values ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A decoded dataclass before it is bound to its type."""

    name: str
    version: int
    fields: dict[str, Any]


def _wire_of(plain: Any) -> dict[str, Any]:
    """Plain value → what :data:`VALUE` builds from."""
    if plain is None:
        return {"tag": "none", "value": None}
    if plain is True or plain is False:
        return {"tag": "true" if plain else "false", "value": None}
    if isinstance(plain, int):
        return {"tag": "int", "value": plain}
    if isinstance(plain, bytes):
        return {"tag": "bytes", "value": plain}
    if isinstance(plain, str):
        return {"tag": "str", "value": plain}
    if isinstance(plain, list):
        return {"tag": "list", "value": [_wire_of(item) for item in plain]}
    if isinstance(plain, Record):
        return {"tag": "record", "value": {
            "name": plain.name, "version": plain.version,
            "fields": [{"name": name, "value": _wire_of(value)}
                       for name, value in plain.fields.items()],
        }}
    if isinstance(plain, dict):
        return {"tag": "map", "value": [{"key": _wire_of(k), "value": _wire_of(v)}
                                        for k, v in plain.items()]}
    raise TypeError(f"cannot encode {type(plain).__name__}")


def _plain_of(wire: Any, path: str) -> Any:
    """What :data:`VALUE` parsed → plain value (duplicate names and keys refused)."""
    tag, body = wire.tag, wire.value
    if tag == "none":
        return None
    if tag in ("true", "false"):
        return tag == "true"
    if tag in ("int", "bytes", "str"):
        return body
    if tag == "list":
        return [_plain_of(item, f"{path}[{i}]") for i, item in enumerate(body)]
    if tag == "record":
        fields: dict[str, Any] = {}
        for entry in body.fields:
            if entry.name in fields:
                raise SnapshotError(f"{path}: field {entry.name!r} appears twice")
            fields[entry.name] = _plain_of(entry.value, f"{path}.{entry.name}")
        return Record(body.name, body.version, fields)
    result: dict[Any, Any] = {}
    for entry in body:
        key = _plain_of(entry.key, f"{path}{{key}}")
        if not isinstance(key, int | str) or isinstance(key, bool):
            raise SnapshotError(f"{path}: a map key must be an integer or a string")
        if key in result:
            raise SnapshotError(f"{path}: key {key!r} appears twice")
        result[key] = _plain_of(entry.value, f"{path}[{key!r}]")
    return result


def build_value(plain: Any) -> bytes:
    """The bytes of a plain value (see :func:`encode`). (Written by :mod:`._writer`,
    which writes what the construct declaration :data:`VALUE` builds, faster.)"""
    from ._writer import build_plain

    return build_plain(plain)


def build_value_with_construct(plain: Any) -> bytes:
    """The bytes of a plain value built by the construct declaration itself: the
    reference :mod:`._writer` is checked against."""
    from ._wire import VALUE

    return bytes(VALUE.build(_wire_of(plain)))


def wire_of(plain: Any) -> dict[str, Any]:
    """The build form of a plain value, to nest :data:`VALUE` in a larger declaration."""
    return _wire_of(plain)


def plain_of(wire: Any, path: str = "value") -> Any:
    """The plain value of what :data:`VALUE` parsed."""
    try:
        return _plain_of(wire, path)
    except RecursionError:
        raise SnapshotError(f"{path}: values are nested too deeply") from None

# -- dataclasses ↔ plain values --------------------------------------------------------


def state_name(cls: type) -> str:
    return str(getattr(cls, "STATE_NAME", cls.__name__))


def state_version(cls: type) -> int:
    return int(getattr(cls, "STATE_VERSION", 1))


@functools.cache
def field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = get_type_hints(cls, include_extras=True)
    return tuple((field.name, hints[field.name]) for field in dataclasses.fields(cls))


def split_annotated(hint: Any) -> tuple[Any, IntRange | None]:
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        ranges = [extra for extra in extras if isinstance(extra, IntRange)]
        return base, ranges[0] if ranges else None
    return hint, None


def _optional_of(hint: Any) -> Any | None:
    """``T`` for ``T | None``; None for anything else."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1 and len(get_args(hint)) == 2:
            return members[0]
        raise TypeError(f"only 'T | None' unions can be encoded, not {hint}")
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (none)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Record):
        return f"a record of type {value.name}"
    return "a map"


def to_plain(value: Any, hint: Any = None, path: str = "") -> Any:
    """A state object → plain values. ``hint`` is the declared type (taken from the
    object itself for a dataclass). Raises TypeError for what cannot be encoded: that
    is a bug in the state's declaration, not bad input."""
    if hint is None:
        hint = type(value)
    hint, int_range = split_annotated(hint)
    inner = _optional_of(hint)
    if inner is not None:
        return None if value is None else to_plain(value, inner, path)
    where = path or state_name(type(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected a bool, got {type(value).__name__}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: expected an int, got {type(value).__name__}")
        if value not in (int_range or _ANY_INT):
            raise TypeError(f"{where}: {value} does not fit in {(int_range or _ANY_INT).name}")
        return value
    if hint is bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{where}: expected bytes, got {type(value).__name__}")
        return bytes(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a str, got {type(value).__name__}")
        return value
    origin = get_origin(hint)
    if origin is list:
        (item_hint,) = get_args(hint)
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        return [to_plain(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = get_args(hint)
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a dict, got {type(value).__name__}")
        return {to_plain(k, key_hint, f"{where}{{key}}"): to_plain(v, value_hint, f"{where}[{k!r}]")
                for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise TypeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return Record(state_name(hint), state_version(hint), {
            name: to_plain(getattr(value, name), field_hint, f"{where}.{name}")
            for name, field_hint in field_hints(hint)
        })
    raise TypeError(f"{where}: cannot encode values of type {hint}")


def from_plain(plain: Any, hint: Any, path: str) -> Any:
    """Plain values → an object of type ``hint``, refusing anything that does not fit
    (one :class:`SnapshotError` line naming ``path``).

    A plan compiled once per type (:func:`_binder`) binds what fits; whatever it
    refuses is bound again by :func:`_from_plain_checked`, the reference, which gives
    the refusal its message (the path of the offending value, built only then)."""
    try:
        binder = _binder(hint)
    except TypeError:  # an unhashable hint: no plan can be kept for it
        return _from_plain_checked(plain, hint, path)
    try:
        return binder(plain)
    except Exception:
        return _from_plain_checked(plain, hint, path)


class _Refused(Exception):
    """A plan found a value that does not fit (the checked path says how)."""


_BINDERS: dict[Any, Any] = {}


def _binder(hint: Any) -> Any:
    """A function binding plain values to ``hint``: the checks of
    :func:`_from_plain_checked`, in its order, without the paths; :class:`_Refused`
    (or the error a constructor raised) where that would refuse."""
    try:
        return _BINDERS[hint]
    except KeyError:
        pass
    binder = _BINDERS[hint] = _compile_binder(hint)
    return binder


def _refuse(plain: Any) -> Any:
    raise _Refused


def _compile_binder(hint: Any) -> Any:
    base, int_range = split_annotated(hint)
    try:
        inner = _optional_of(base)
    except TypeError:
        return _refuse  # the checked path raises the TypeError
    if inner is not None:
        inner_binder = _binder(inner)
        return lambda plain: None if plain is None else inner_binder(plain)
    if base is bool:
        def boolean(plain: Any) -> Any:
            if plain is True or plain is False:
                return plain
            raise _Refused
        return boolean
    if base is int:
        allowed = int_range or _ANY_INT
        low, high = allowed.low, allowed.high

        def integer(plain: Any) -> Any:
            if plain.__class__ is not int and (not isinstance(plain, int)
                                               or isinstance(plain, bool)):
                raise _Refused
            if not low <= plain <= high:
                raise _Refused
            return plain
        return integer
    if base is bytes or base is str:
        def exact(plain: Any) -> Any:
            if not isinstance(plain, base):
                raise _Refused
            return plain
        return exact
    origin = get_origin(base)
    if origin is list:
        (item_hint,) = get_args(base)
        item_binder = _binder(item_hint)

        def sequence(plain: Any) -> Any:
            if not isinstance(plain, list):
                raise _Refused
            return [item_binder(item) for item in plain]
        return sequence
    if origin is dict:
        key_hint, value_hint = get_args(base)
        key_binder, value_binder = _binder(key_hint), _binder(value_hint)

        def mapping(plain: Any) -> Any:
            if not isinstance(plain, dict):
                raise _Refused
            result = {key_binder(k): value_binder(v) for k, v in plain.items()}
            if len(result) != len(plain):
                raise _Refused  # two keys bound to one: let the checked path decide
            return result
        return mapping
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return _record_binder(base)
    return _refuse


def _record_binder(cls: type) -> Any:
    name, version = state_name(cls), state_version(cls)
    hints = field_hints(cls)
    names = frozenset(field for field, _ in hints)
    plan: tuple[tuple[str, Any], ...] | None = None

    def record(plain: Any) -> Any:
        nonlocal plan
        if plain.__class__ is not Record or plain.name != name:
            raise _Refused
        fields = plain.fields
        if plain.version != version:
            upgrade = getattr(cls, "upgrade_state", None)
            if not 1 <= plain.version < version or upgrade is None:
                raise _Refused
            fields = upgrade(plain.version, dict(fields))
        if fields.keys() != names:
            raise _Refused
        if plan is None:
            # Made whole, then set in one step (made on the first call: a dataclass may
            # contain itself).
            plan = tuple((field, _binder(hint)) for field, hint in hints)
        return cls(**{field: binder(fields[field]) for field, binder in plan})
    return record


def _from_plain_checked(plain: Any, hint: Any, path: str) -> Any:
    """:func:`from_plain`, checking every value on the way and naming the path of the
    first that does not fit."""
    hint, int_range = split_annotated(hint)
    inner = _optional_of(hint)
    if inner is not None:
        return None if plain is None else _from_plain_checked(plain, inner, path)

    def wrong(expected: str) -> SnapshotError:
        return SnapshotError(f"{path}: expected {expected}, found {_describe(plain)}")

    if hint is bool:
        if not isinstance(plain, bool):
            raise wrong("a boolean")
        return plain
    if hint is int:
        if not isinstance(plain, int) or isinstance(plain, bool):
            raise wrong("an integer")
        allowed = int_range or _ANY_INT
        if plain not in allowed:
            raise SnapshotError(f"{path}: {plain} does not fit in {allowed.name}")
        return plain
    if hint is bytes:
        if not isinstance(plain, bytes):
            raise wrong("bytes")
        return plain
    if hint is str:
        if not isinstance(plain, str):
            raise wrong("a string")
        return plain
    origin = get_origin(hint)
    if origin is list:
        (item_hint,) = get_args(hint)
        if not isinstance(plain, list):
            raise wrong("a list")
        return [_from_plain_checked(item, item_hint, f"{path}[{i}]")
                for i, item in enumerate(plain)]
    if origin is dict:
        key_hint, value_hint = get_args(hint)
        if not isinstance(plain, dict):
            raise wrong("a map")
        return {_from_plain_checked(k, key_hint, f"{path}{{key}}"):
                _from_plain_checked(v, value_hint, f"{path}[{k!r}]")
                for k, v in plain.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _bind_record(plain, hint, path)
    raise TypeError(f"{path}: cannot decode values of type {hint}")


def _bind_record(plain: Any, cls: type, path: str) -> Any:
    name = state_name(cls)
    if not isinstance(plain, Record):
        raise SnapshotError(f"{path}: expected a record of type {name}, found "
                            f"{_describe(plain)}")
    if plain.name != name:
        raise SnapshotError(f"{path}: expected a record of type {name}, found one of type "
                            f"{plain.name}")
    fields = plain.fields
    version = state_version(cls)
    if plain.version != version:
        upgrade = getattr(cls, "upgrade_state", None)
        # Versions start at 1: a 0 is no version any avmm wrote.
        if not 1 <= plain.version < version or upgrade is None:
            raise SnapshotError(
                f"{path}: {name} is version {plain.version} in the file; this avmm reads "
                f"version {version}" + (" (written by a newer avmm?)"
                                        if plain.version > version else ""))
        fields = upgrade(plain.version, dict(fields))
    hints = dict(field_hints(cls))
    unknown = sorted(set(fields) - set(hints))
    if unknown:
        raise SnapshotError(f"{path}: unknown field {unknown[0]!r} in {name} "
                            "(written by a newer avmm?)")
    missing = [field for field in hints if field not in fields]
    if missing:
        raise SnapshotError(f"{path}: {name} lacks field {missing[0]!r}")
    values = {field: _from_plain_checked(fields[field], hint, f"{path}.{field}")
              for field, hint in hints.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{path}: {e}") from None


def prepare(hint: Any) -> None:
    """Make everything encoding and decoding values of ``hint`` needs once (the type
    hints of every dataclass it contains, the plans that bind them), ahead of a time
    that counts: the first use of a state type costs milliseconds (``get_type_hints``),
    which a migration would otherwise pay while the guest is paused."""
    from ._writer import _encoder

    seen: set[Any] = set()
    pending = [hint]
    while pending:
        hint = pending.pop()
        if hint in seen:
            continue
        seen.add(hint)
        _binder(hint)
        _encoder(hint)
        base, _ = split_annotated(hint)
        try:
            inner = _optional_of(base)
        except TypeError:
            continue  # a union no value of can be encoded: encoding says so
        if inner is not None:
            pending.append(inner)
        elif get_origin(base) in (list, dict):
            pending.extend(get_args(base))
        elif isinstance(base, type) and dataclasses.is_dataclass(base):
            pending.extend(field_hint for _, field_hint in field_hints(base))


def encode(state: Any) -> bytes:
    """A state dataclass → bytes (one :data:`VALUE`): ``build_value(to_plain(state))``,
    by :mod:`._writer`'s compiled plan for its type."""
    from ._writer import encode_state

    return encode_state(state)


def decode(data: bytes, cls: type[Any], *, path: str | None = None) -> Any:
    """Bytes of one :data:`VALUE` → a ``cls``; :class:`SnapshotError` for anything that
    is not exactly such a value. (Parsed by :mod:`._reader`, which reads what the
    construct declaration :data:`VALUE` describes, faster.)"""
    from ._reader import read_values

    where = path or state_name(cls)
    return from_plain(read_values(data, False, where), cls, where)


def decode_with_construct(data: bytes, path: str = "value") -> Any:
    """The plain value of ``data`` parsed by the construct declaration itself: the
    reference :mod:`._reader` is checked against."""
    import construct as c

    from ._wire import VALUE

    try:
        wire = c.Struct("value" / VALUE, c.Terminated).parse(data)
    except RecursionError:
        raise SnapshotError(f"{path}: values are nested too deeply") from None
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path}: malformed ({construct_reason(e)})") from None
    return plain_of(wire.value, path)


_REASON_MAX = 120


def construct_reason(error: Exception) -> str:
    """A construct error as one line: what went wrong, then where (construct puts the
    path first and the reason on the next line)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reason = lines[-1]
    if len(reason) > _REASON_MAX:  # construct quotes the offending bytes, which may be many
        reason = reason[:_REASON_MAX] + "..."
    where = getattr(error, "path", None)
    if where and isinstance(where, str):
        where = where.replace("(parsing)", "").replace("(building)", "").strip(" ->")
        if where:
            return f"{reason} (at {where})"
    return reason


__all__ = [
    "S64", "U8", "U16", "U32", "U64", "VALUE", "IntRange", "Record", "decode", "encode",
    "from_plain", "to_plain",
]
