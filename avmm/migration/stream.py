"""The migration stream: a header, then typed frames, declared once with construct.

Layout (little-endian)::

    header   magic b"AVMMMIGR", u32 version (VERSION), u8-prefixed UTF-8 writer
    frame    u8 kind, u32 length, ``length`` bytes of payload (at most MAX_FRAME)

Source → destination, in this order::

    CONFIG   the VM's config (the snapshot's "config" section, codec-encoded)
    PAGES*   a batch of guest RAM pages: u16 count, count u64 page numbers (RAM file
             offset / 4096, as avmm.state.memory_file numbers them), count kind bytes
             (0: all zeros, nothing follows; 1: data), then 4096 bytes per data page
    ROUND*   u32 round, u64 pages dirty at its start: a pass over dirtied pages begins
    STATE    the snapshot state file's bytes (avmm.state.format: its own version and
             SHA-256) with the "machine", "devices" and "virtio" sections
    END      u64 pages sent, SHA-256 of every byte of the stream before this frame
    COMMIT   after the destination's ACK: the source has let go, the guest may run

Destination → source: READY (the machine is built; send memory), ACK (everything
received and loaded; the source may stop), or ERROR (u16-prefixed UTF-8 line: why
the destination refuses; it discards what it received). Either side may send ERROR.

Everything a destination reads is checked before use: the magic and version first,
each frame's kind and length (nothing larger than :data:`MAX_FRAME` is ever buffered),
the order of the frames, every page number against the size of RAM, every count
against the bytes that carry it. A violation is one :class:`MigrationError` line.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import construct as c
import trio

from .errors import MigrationError

MAGIC = b"AVMMMIGR"
VERSION = 1
PAGE_SIZE = 4096
#: Pages per PAGES frame: 1 MiB of data at most, small enough to interleave with
#: anything else and to bound what a destination buffers.
MAX_BATCH_PAGES = 256
#: The largest frame payload: a full batch, or a state file (a few KiB per vCPU and
#: device; far less than this).
MAX_FRAME = 64 << 20
#: The longest ERROR line kept.
MAX_ERROR_BYTES = 1000

HEADER = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Int32ul,
    "writer" / c.PascalString(c.Int8ul, "utf8"),
)


class Kind(enum.IntEnum):
    CONFIG = 1
    PAGES = 2
    ROUND = 3
    STATE = 4
    END = 5
    COMMIT = 6
    READY = 16
    ACK = 17
    ERROR = 18


FRAME_HEADER = c.Struct(
    "kind" / c.Int8ul,
    "length" / c.Int32ul,
)
FRAME_HEADER_SIZE = FRAME_HEADER.sizeof()

PAGES = c.Struct(
    "count" / c.Int16ul,
    # Raw little-endian u64s and bytes (hot path: read with memoryview casts, not one
    # construct object per page).
    "numbers" / c.Bytes(c.this.count * 8),
    "kinds" / c.Bytes(c.this.count),
    "data" / c.GreedyBytes,
)
PAGES_FIXED = c.Struct("count" / c.Int16ul)
ROUND = c.Struct("round" / c.Int32ul, "pages_dirty" / c.Int64ul, c.Terminated)
END = c.Struct("pages_sent" / c.Int64ul, "sha256" / c.Bytes(32), c.Terminated)
ERROR = c.Struct("message" / c.PascalString(c.Int16ul, "utf8"), c.Terminated)

ZERO_PAGE = bytes(PAGE_SIZE)
KIND_ZERO = 0
KIND_DATA = 1


def writer() -> str:
    from .. import __version__

    return f"avmm {__version__}"


def build_pages(numbers: list[int], pages: list[bytes | None]) -> bytes:
    """A PAGES payload: ``pages[i]`` is page ``numbers[i]``'s data, None for zeros."""
    import array

    kinds = bytes(KIND_ZERO if page is None else KIND_DATA for page in pages)
    return PAGES.build({
        "count": len(numbers),
        "numbers": array.array("Q", numbers).tobytes(),
        "kinds": kinds,
        "data": b"".join(page for page in pages if page is not None),
    })


@dataclass(frozen=True)
class PageBatch:
    """A checked PAGES payload: page numbers, which are zero, and the data pages."""

    numbers: memoryview  # u64
    kinds: bytes
    data: memoryview


def parse_pages(payload: bytes, total_pages: int) -> PageBatch:
    """A PAGES payload, checked: the count, the kinds, the data length, and every page
    number below ``total_pages``."""
    try:
        count = PAGES_FIXED.parse(payload).count
        parsed = PAGES.parse(payload)
    except c.ConstructError:
        raise MigrationError("corrupt PAGES frame (shorter than its count says)") from None
    if not 0 < count <= MAX_BATCH_PAGES:
        raise MigrationError(f"PAGES frame with {count} pages (1..{MAX_BATCH_PAGES})")
    numbers = memoryview(parsed.numbers).cast("Q")
    kinds = parsed.kinds
    data_pages = kinds.count(KIND_DATA)
    if data_pages + kinds.count(KIND_ZERO) != count:
        raise MigrationError("PAGES frame with an unknown page kind")
    if len(parsed.data) != data_pages * PAGE_SIZE:
        raise MigrationError(f"PAGES frame: {data_pages} data pages need "
                             f"{data_pages * PAGE_SIZE} bytes, it carries "
                             f"{len(parsed.data)}")
    if max(numbers) >= total_pages:
        raise MigrationError(f"PAGES frame names page {max(numbers)}; guest RAM has "
                             f"{total_pages}")
    return PageBatch(numbers=numbers, kinds=kinds, data=memoryview(parsed.data))


class Channel:
    """Frames over one trio stream, both ways, with byte counts and (for the
    source → destination direction) a running SHA-256 that END carries."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.bytes_sent = 0
        self.bytes_received = 0
        self._buffer = bytearray()
        self.sent_digest = hashlib.sha256()
        self.received_digest = hashlib.sha256()
        #: The received SHA-256 as it was before the last frame (what END must carry).
        self.digest_before_frame = self.received_digest.copy()

    # -- sending ------------------------------------------------------------------------

    async def send_header(self) -> None:
        await self._send(HEADER.build({"version": VERSION, "writer": writer()}))

    async def send(self, kind: Kind, payload: bytes = b"") -> None:
        if len(payload) > MAX_FRAME:  # pragma: no cover - the writers never build one
            raise MigrationError(f"{kind.name} frame of {len(payload)} bytes is too large")
        await self._send(FRAME_HEADER.build({"kind": kind, "length": len(payload)}) + payload)

    async def send_error(self, message: str) -> None:
        text = message.encode()[:MAX_ERROR_BYTES].decode(errors="ignore")
        await self.send(Kind.ERROR, ERROR.build({"message": text}))

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise MigrationError(f"the migration stream broke: {_why(e)}") from None
        self.sent_digest.update(data)
        self.bytes_sent += len(data)

    # -- receiving ----------------------------------------------------------------------

    async def receive_header(self) -> None:
        head = await self._receive_exactly(len(MAGIC) + 4 + 1, what="the stream header")
        if head[:len(MAGIC)] != MAGIC:
            raise MigrationError("not an avmm migration stream (no AVMMMIGR magic)")
        writer_length = head[-1]
        rest = await self._receive_exactly(writer_length, what="the stream header")
        try:
            header = HEADER.parse(head + rest)
        except (c.ConstructError, UnicodeDecodeError):
            raise MigrationError("corrupt migration stream header") from None
        if header.version != VERSION:
            raise MigrationError(f"migration stream version {header.version} (from "
                                 f"{header.writer!r}); this avmm ({writer()}) reads "
                                 f"version {VERSION}")

    async def receive(self) -> tuple[Kind, bytes]:
        """The next frame: its kind and payload. An ERROR frame from the peer raises
        :class:`MigrationError` with the peer's line."""
        self.digest_before_frame = self.received_digest.copy()
        raw = await self._receive_exactly(FRAME_HEADER_SIZE, what="a frame")
        header = FRAME_HEADER.parse(raw)
        try:
            kind = Kind(header.kind)
        except ValueError:
            raise MigrationError(f"unknown frame kind {header.kind}") from None
        if header.length > MAX_FRAME:
            raise MigrationError(f"{kind.name} frame of {header.length} bytes (at most "
                                 f"{MAX_FRAME})")
        payload = await self._receive_exactly(header.length, what=f"a {kind.name} frame")
        if kind is Kind.ERROR:
            try:
                message = ERROR.parse(payload).message
            except (c.ConstructError, UnicodeDecodeError):
                message = "(unreadable message)"
            raise PeerError(message)
        return kind, payload

    async def _receive_exactly(self, size: int, *, what: str) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            try:
                chunk = await self.stream.receive_some(max(1 << 20, size - len(buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise MigrationError(f"the migration stream broke in {what}: "
                                     f"{_why(e)}") from None
            if not chunk:
                raise MigrationError(f"the migration stream ended in {what}")
            buffer += chunk
        data = bytes(buffer[:size])
        del buffer[:size]
        self.received_digest.update(data)
        self.bytes_received += size
        return data


class PeerError(MigrationError):
    """The other side sent ERROR: its line is the message."""


def _why(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
