"""The snapshot state file: a header, the state, and a SHA-256 of everything before it.

Layout (little-endian), declared once below with construct::

    magic           8 bytes   b"AVMMSNAP"
    format_version  u32       FORMAT_VERSION (the layout of this file)
    writer          u8 length + UTF-8: the avmm that wrote it ("avmm 0.1.0")
    payload_length  u64
    payload         payload_length bytes: a varint count, then that many sections,
                    each a name (varint length + UTF-8) and one codec VALUE
                    (see avmm.state.codec: a tagged, self-describing record)
    sha256          32 bytes  SHA-256 of every byte before it

Sections are named parts of the state ("machine", "memory", later "devices",
"config"); each holds one versioned record. A reader names the sections it expects
and their types: a missing, unknown or repeated section is refused, as is every value
that does not fit its type (see :mod:`avmm.state.codec`).

A reader checks, in order, so that the message says what is wrong: the magic, the
header, the format version, the length (truncation), the SHA-256 (corruption), then the
payload. Every failure is one :class:`SnapshotError` line starting with the file name.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import construct as c

from ._errors import SnapshotError
from ._reader import read_values
from ._writer import _varint, text_bytes, write_plain, write_state
from .codec import NAME, VALUE, VAR_UINT, from_plain, to_plain, wire_of

MAGIC = b"AVMMSNAP"
FORMAT_VERSION = 1
#: A state file is a few KiB per vCPU and device (28 KiB for two vCPUs and a disk);
#: anything this large is not one. Checked on the file's size before it is read.
MAX_STATE_FILE_BYTES = 64 << 20
DIGEST_SIZE = 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

HEADER = c.Struct(
    "magic" / c.Const(MAGIC),
    "format_version" / c.Int32ul,
    "writer" / c.PascalString(c.Int8ul, "utf8"),
    "payload_length" / c.Int64ul,
)

PAYLOAD = c.Struct(
    "sections" / c.PrefixedArray(VAR_UINT, c.Struct("name" / NAME, "value" / VALUE)),
    c.Terminated,
)

STATE_FILE = c.Struct(
    "body" / c.RawCopy(c.Struct(
        "header" / HEADER,
        # PAYLOAD's bytes. A reader parses them only once the digest is checked (with
        # avmm.state._reader, which reads what PAYLOAD declares, faster).
        "payload" / c.FixedSized(c.this.header.payload_length, c.GreedyBytes),
    )),
    "sha256" / c.Checksum(c.Bytes(DIGEST_SIZE), lambda data: hashlib.sha256(data).digest(),
                          c.this.body.data),
    c.Terminated,
)


def _writer() -> str:
    from .. import __version__

    return f"avmm {__version__}"


def build_state(sections: Mapping[str, Any]) -> bytes:
    """The bytes of a state file holding ``sections`` (name → state dataclass or
    None): what :func:`build_state_with_construct` builds from the declarations above,
    written directly (it is on a migration's downtime; tests/state/test_writer.py
    checks that the bytes are the same)."""
    payload = bytearray()
    _varint(payload, len(sections))
    for name, value in sections.items():
        payload += text_bytes(name)
        if value is None:
            write_plain(payload, None)
        else:
            write_state(payload, value)
    writer = _writer().encode("utf-8")
    if len(writer) > 0xFF:  # pragma: no cover - avmm's own version string
        raise ValueError("the writer's name is too long for a state file")
    body = b"".join((MAGIC, _U32.pack(FORMAT_VERSION), bytes([len(writer)]), writer,
                     _U64.pack(len(payload)), payload))
    return body + hashlib.sha256(body).digest()


def build_state_with_construct(sections: Mapping[str, Any]) -> bytes:
    """The bytes of a state file built by the construct declarations themselves: the
    reference :func:`build_state` is checked against."""
    payload = PAYLOAD.build({"sections": [
        {"name": name, "value": wire_of(to_plain(value) if value is not None else None)}
        for name, value in sections.items()
    ]})
    return bytes(STATE_FILE.build({
        "body": {"value": {
            "header": {"format_version": FORMAT_VERSION, "writer": _writer(),
                       "payload_length": len(payload)},
            "payload": payload,
        }},
        "sha256": None,
    }))


def parse_state(data: bytes, expect: Mapping[str, Any], *, name: str = "state file") \
        -> dict[str, Any]:
    """The sections of a state file, each bound to its type in ``expect`` (a type may
    be ``T | None``). :class:`SnapshotError` for anything else, prefixed with ``name``."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise SnapshotError(f"{name}: truncated ({len(data)} bytes, not even a header)")
        raise SnapshotError(f"{name}: not an avmm snapshot state file (no {MAGIC.decode()} "
                            "magic)")
    try:
        header = HEADER.parse(data)
    except c.StreamError:
        raise SnapshotError(f"{name}: truncated in its header ({len(data)} bytes)") from None
    except (c.ConstructError, UnicodeDecodeError):
        raise SnapshotError(f"{name}: corrupt header") from None
    if header.format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"{name}: written in state file format {header.format_version} (by "
            f"{header.writer!r}); this avmm ({_writer()}) reads format {FORMAT_VERSION}")
    header_size = len(HEADER.build(header))
    total = header_size + header.payload_length + DIGEST_SIZE
    if len(data) < total:
        raise SnapshotError(f"{name}: truncated or corrupt: its header announces {total} "
                            f"bytes, the file has {len(data)}")
    if len(data) > total:
        raise SnapshotError(f"{name}: corrupt: {len(data) - total} bytes after its end")
    if hashlib.sha256(data[:-DIGEST_SIZE]).digest() != data[-DIGEST_SIZE:]:
        raise SnapshotError(f"{name}: corrupt (its SHA-256 does not match its contents)")
    payload = data[header_size:header_size + header.payload_length]
    try:
        # The section names are checked as they come, before their values are read.
        sections = read_values(payload, True, "state", sections=tuple(expect))
    except SnapshotError as e:
        raise SnapshotError(f"{name}: {e}") from None

    found: dict[str, Any] = {}
    for section, value in sections:
        if section in found:
            raise SnapshotError(f"{name}: section {section!r} appears twice")
        if section not in expect:
            raise SnapshotError(f"{name}: unknown section {section!r} (written by a "
                                "newer avmm?)")
        found[section] = value
    missing = [section for section in expect if section not in found]
    if missing:
        raise SnapshotError(f"{name}: has no {missing[0]!r} section")
    try:
        return {section: from_plain(found[section], expect[section], section)
                for section in expect}
    except SnapshotError as e:
        raise SnapshotError(f"{name}: {e}") from None


def write_state_file(path: Path | str, sections: Mapping[str, Any], *,
                     dir_fd: int | None = None) -> int:
    """Write a new state file (fails if ``path`` exists, even as a dangling symlink;
    relative to ``dir_fd`` if given) and fsync it; its size."""
    data = build_state(sections)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        return _write_state_bytes(fd, data)
    finally:
        os.close(fd)


def write_state_fd(fd: int, sections: Mapping[str, Any]) -> int:
    """Write the state file holding ``sections`` into the open regular file ``fd``
    (which stays open) from offset 0, cut it there and fsync it; its size. Needs only
    fstat, pwrite, ftruncate and fsync on ``fd`` (a jailed worker is handed such a
    file, never its directory)."""
    data = build_state(sections)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise SnapshotError("the state file to write is not a regular file")
    return _write_state_bytes(fd, data)


def _write_state_bytes(fd: int, data: bytes) -> int:
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)
    os.ftruncate(fd, len(data))  # whatever the file held beyond goes
    os.fsync(fd)
    return len(data)


def read_state_file(path: Path, expect: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`parse_state` of the file at ``path``; a missing, unreadable, oversized or
    not regular file is a :class:`SnapshotError` too. (A snapshot's state file is read
    through its directory's fd instead: :func:`avmm.state.snapshot.read_snapshot`.)"""
    try:
        # O_NONBLOCK: a FIFO must be refused (below), not waited on in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such state file") from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read the state file: {e.strerror}") from None
    try:
        return read_state_fd(fd, expect, name=str(path))
    finally:
        os.close(fd)


def read_state_fd(fd: int, expect: Mapping[str, Any], *, name: str) -> dict[str, Any]:
    """:func:`parse_state` of the open file ``fd`` (``name`` in messages), which must be
    a regular file of at most :data:`MAX_STATE_FILE_BYTES`. Reads from offset 0 and
    never blocks on the file's type (a FIFO or a device is refused by ``fstat``)."""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SnapshotError(f"{name}: is a directory, not a state file")
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{name}: is {_kind(info.st_mode)}, not a regular file; a "
                                "state file must be one")
        if info.st_size > MAX_STATE_FILE_BYTES:
            raise SnapshotError(f"{name}: {info.st_size} bytes is too large for a state file "
                                f"(at most {MAX_STATE_FILE_BYTES})")
        chunks = []
        offset = 0
        while offset <= MAX_STATE_FILE_BYTES:
            chunk = os.pread(fd, MAX_STATE_FILE_BYTES + 1 - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise SnapshotError(f"{name}: cannot read the state file: {e.strerror}") from None
    if len(data) > MAX_STATE_FILE_BYTES:
        raise SnapshotError(f"{name}: too large for a state file (it grew while read; at "
                            f"most {MAX_STATE_FILE_BYTES} bytes)")
    return parse_state(data, expect, name=name)


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"
