"""The migration stream: a header, then typed frames, declared once with construct.

Layout (little-endian)::

    header   magic b"AVMMMIGR", u32 version (VERSION), u8-prefixed UTF-8 writer
    frame    u8 kind, u32 length, ``length`` bytes of payload (at most MAX_FRAME)

Source → destination, in this order::

    CONFIG   the VM's config (the snapshot's "config" section, codec-encoded)
    PAGES*   runs of consecutive guest RAM pages: u16 count of runs, then per run u64
             first page (RAM file offset / 4096, as avmm.state.memory_file numbers
             them), u32 pages, u8 kind (0: all zeros, nothing follows; 1: data); then
             4096 bytes per page of each data run, in run order (at most
             MAX_FRAME_PAGES data pages per frame)
    ROUND*   u32 round, u64 pages dirty at its start: a pass over dirtied pages begins
    SYNC     (empty) the pre-copy is over: the destination answers SYNCED once it has
             received, stored and hashed everything before it; only then does the
             source pause the guest, so that none of that work is downtime
    STATE    the snapshot state file's bytes (avmm.state.format: its own version and
             SHA-256) with the "machine", "devices" and "virtio" sections
    END      u64 pages sent, SHA-256 of every byte of the stream before this frame
    COMMIT   after the destination's ACK: the source has let go, the guest may run

Destination → source: READY (the machine is built; send memory), SYNCED (the answer to
SYNC), ACK (everything received and loaded; the source may stop), STARTED (the answer
to COMMIT: the guest runs here), or ERROR (u16-prefixed UTF-8 line: why the
destination refuses; it discards what it received; answering COMMIT: it could not
start the guest, no vCPU ran). Either side may send ERROR.

Everything a destination reads is checked before use: the magic and version first,
each frame's kind and length (nothing larger than :data:`MAX_FRAME` is ever buffered),
the order of the frames, every page number against the size of RAM, every count
against the bytes that carry it. A violation is one :class:`MigrationError` line.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import construct as c
import trio

from .errors import MigrationError

MAGIC = b"AVMMMIGR"
#: 2: PAGES frames carry runs of pages (version 1: one number and kind per page).
#: 3: SYNC/SYNCED before the pause. 4: STARTED answers COMMIT.
VERSION = 4
PAGE_SIZE = 4096
#: Pages a PAGES frame covers (its data pages, and so its data, at most 8 MiB): big
#: enough that the per-frame work is small beside the copy, small enough to bound
#: what either side holds at once.
MAX_FRAME_PAGES = 2048
#: Runs per PAGES frame: a frame of MAX_FRAME_PAGES pages holds at most that many.
MAX_FRAME_RUNS = MAX_FRAME_PAGES
#: The largest frame payload: a full PAGES frame, or a state file (a few KiB per vCPU
#: and device; far less than this).
MAX_FRAME = 64 << 20
#: The longest ERROR line kept.
MAX_ERROR_BYTES = 1000
#: Data this large is hashed in a worker thread, off the event loop.
HASH_IN_THREAD_BYTES = 1 << 20

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
    SYNC = 7
    READY = 16
    ACK = 17
    ERROR = 18
    SYNCED = 19
    STARTED = 20


FRAME_HEADER = c.Struct(
    "kind" / c.Int8ul,
    "length" / c.Int32ul,
)
FRAME_HEADER_SIZE = FRAME_HEADER.sizeof()

#: A PAGES frame's head: the run count, then each run (hot path: packed and unpacked
#: with struct, not one construct object per run).
PAGES_COUNT = struct.Struct("<H")
PAGES_RUN = struct.Struct("<QIB")
ROUND = c.Struct("round" / c.Int32ul, "pages_dirty" / c.Int64ul, c.Terminated)
END = c.Struct("pages_sent" / c.Int64ul, "sha256" / c.Bytes(32), c.Terminated)
ERROR = c.Struct("message" / c.PascalString(c.Int16ul, "utf8"), c.Terminated)

ZERO_PAGE = bytes(PAGE_SIZE)
KIND_ZERO = 0
KIND_DATA = 1


def writer() -> str:
    from .. import __version__

    return f"avmm {__version__}"


#: A run of a PAGES frame: (first page, pages, kind).
Run = tuple[int, int, int]


def pages_head(runs: Sequence[Run]) -> bytes:
    """A PAGES payload's head (the data of its data runs follows it)."""
    return PAGES_COUNT.pack(len(runs)) + b"".join(PAGES_RUN.pack(*run) for run in runs)


def build_pages(runs: Sequence[Run], data: bytes = b"") -> bytes:
    """A whole PAGES payload: ``runs``, then ``data`` (every data run's pages)."""
    return pages_head(runs) + data


def check_pages_length(payload_length: int) -> None:
    """A PAGES frame must hold at least its run count (checked before reading it: a
    shorter frame would have the reader wait for bytes of the next one)."""
    if payload_length < PAGES_COUNT.size:
        raise MigrationError("corrupt PAGES frame (shorter than its run count)")


def runs_length(count_bytes: bytes, payload_length: int) -> int:
    """The bytes of runs that follow a PAGES frame's two count bytes, checked against
    the count's limits and the frame's length."""
    check_pages_length(payload_length)
    if len(count_bytes) != PAGES_COUNT.size:
        raise MigrationError("corrupt PAGES frame (shorter than its run count)")
    (count,) = PAGES_COUNT.unpack(count_bytes)
    if not 0 < count <= MAX_FRAME_RUNS:
        raise MigrationError(f"PAGES frame with {count} runs (1..{MAX_FRAME_RUNS})")
    length = count * PAGES_RUN.size
    if PAGES_COUNT.size + length > payload_length:
        raise MigrationError("corrupt PAGES frame (shorter than its runs)")
    return length


def parse_runs(runs_bytes: bytes, payload_length: int, total_pages: int) -> list[Run]:
    """A PAGES frame's runs (the bytes :func:`runs_length` said), checked: each of at
    least one page, inside RAM, of a known kind; at most :data:`MAX_FRAME_PAGES` data
    pages in all, whose bytes fill the rest of the frame exactly."""
    if not runs_bytes or len(runs_bytes) % PAGES_RUN.size:
        raise MigrationError("corrupt PAGES frame (a partial run)")
    runs = list(PAGES_RUN.iter_unpack(runs_bytes))
    data_pages = 0
    for first, pages, kind in runs:
        if pages == 0:
            raise MigrationError("PAGES frame with an empty run")
        if kind == KIND_DATA:
            data_pages += pages
        elif kind != KIND_ZERO:
            raise MigrationError(f"PAGES frame with an unknown page kind {kind}")
        if first + pages > total_pages:
            raise MigrationError(f"PAGES frame names pages {first}..{first + pages - 1}; "
                                 f"guest RAM has {total_pages}")
    if data_pages > MAX_FRAME_PAGES:
        raise MigrationError(f"PAGES frame with {data_pages} data pages (at most "
                             f"{MAX_FRAME_PAGES})")
    data_length = payload_length - PAGES_COUNT.size - len(runs_bytes)
    if data_length != data_pages * PAGE_SIZE:
        raise MigrationError(f"PAGES frame: {data_pages} data pages need "
                             f"{data_pages * PAGE_SIZE} bytes, it carries {data_length}")
    return runs


def parse_pages(payload: bytes, total_pages: int) -> tuple[list[Run], memoryview]:
    """A whole PAGES payload, checked: its runs and the data that follows them."""
    length = runs_length(payload[:PAGES_COUNT.size], len(payload))
    end = PAGES_COUNT.size + length
    runs = parse_runs(payload[PAGES_COUNT.size:end], len(payload), total_pages)
    return runs, memoryview(payload)[end:]


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
        #: The received SHA-256 as it was before the last frame (what END must carry);
        #: only once :meth:`hashed` has returned.
        self.digest_before_frame = self.received_digest.copy()
        # Received bytes not in received_digest yet, in stream order (None: a frame
        # starts there), and the worker thread hashing the ones before them.
        self._unhashed: list[bytes | memoryview | None] = []
        self._hashing: trio.Event | None = None
        self._hash_error: BaseException | None = None

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
        await self.send_hashed(data)
        self.sent_digest.update(data)

    @staticmethod
    def frame_header(kind: Kind, length: int) -> bytes:
        """The header of a frame of ``length`` payload bytes (for :meth:`send_hashed`)."""
        if length > MAX_FRAME:  # pragma: no cover - the writers never build one
            raise MigrationError(f"{kind.name} frame of {length} bytes is too large")
        return FRAME_HEADER.build({"kind": kind, "length": length})

    async def send_hashed(self, *parts: bytes | memoryview) -> None:
        """Send ``parts`` whose bytes the caller has already added to
        :attr:`sent_digest`, in stream order (a worker thread hashes big frames while
        this side sends the one before)."""
        try:
            for part in parts:
                await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise MigrationError(f"the migration stream broke: {_why(e)}") from None
        self.bytes_sent += sum(len(part) for part in parts)

    # -- receiving ----------------------------------------------------------------------

    async def receive_header(self) -> None:
        head = await self.receive_exactly(len(MAGIC) + 4 + 1, what="the stream header")
        if head[:len(MAGIC)] != MAGIC:
            raise MigrationError("not an avmm migration stream (no AVMMMIGR magic)")
        writer_length = head[-1]
        rest = await self.receive_exactly(writer_length, what="the stream header")
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
        kind, length = await self.receive_frame_header()
        return kind, await self.receive_payload(kind, length)

    async def receive_frame_header(self) -> tuple[Kind, int]:
        """The next frame's kind and payload length (checked); the payload is left for
        :meth:`receive_payload`, or for :meth:`receive_exactly` and
        :meth:`receive_into` piece by piece."""
        self._hash(None)
        raw = await self.receive_exactly(FRAME_HEADER_SIZE, what="a frame")
        header = FRAME_HEADER.parse(raw)
        try:
            kind = Kind(header.kind)
        except ValueError:
            raise MigrationError(f"unknown frame kind {header.kind}") from None
        if header.length > MAX_FRAME:
            raise MigrationError(f"{kind.name} frame of {header.length} bytes (at most "
                                 f"{MAX_FRAME})")
        return kind, header.length

    async def receive_payload(self, kind: Kind, length: int) -> bytes:
        # Every frame but PAGES waits for the data before it to be hashed: a page that
        # comes again in a later round is then never overwritten before it was hashed.
        await self.hashed()
        payload = await self.receive_exactly(length, what=f"a {kind.name} frame")
        if kind is Kind.ERROR:
            try:
                message = ERROR.parse(payload).message
            except (c.ConstructError, UnicodeDecodeError):
                message = "(unreadable message)"
            raise PeerError(message)
        return payload

    async def receive_exactly(self, size: int, *, what: str) -> bytes:
        """The next ``size`` bytes. Reads no further than that: what follows may go
        straight into guest RAM (:meth:`receive_into`)."""
        buffer = self._buffer
        while len(buffer) < size:
            buffer += await self._receive_some(size - len(buffer), what)
        data = bytes(buffer[:size])
        del buffer[:size]
        self._hash(data)
        self.bytes_received += size
        return data

    async def receive_into(self, view: memoryview, *, what: str) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes, received straight into it
        (no copy in between), and hash them."""
        filled = 0
        if self._buffer:  # pragma: no cover - receive_exactly never reads ahead
            filled = min(len(self._buffer), len(view))
            view[:filled] = self._buffer[:filled]
            del self._buffer[:filled]
        sock = getattr(self.stream, "socket", None)
        while filled < len(view):
            try:
                if sock is not None:
                    got = await sock.recv_into(view[filled:])
                else:
                    chunk = await self.stream.receive_some(len(view) - filled)
                    got = len(chunk)
                    view[filled:filled + got] = chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise MigrationError(f"the migration stream broke in {what}: "
                                     f"{_why(e)}") from None
            if not got:
                raise MigrationError(f"the migration stream ended in {what}")
            filled += got
        self._hash(view)
        self.bytes_received += len(view)

    # -- hashing what was received ------------------------------------------------------
    # Big data is hashed by a worker thread (hashlib lets go of the GIL) while this side
    # receives the next frame: everything received goes through _hash, in order.

    def _hash(self, data: bytes | memoryview | None) -> None:
        """Add received ``data`` to the digest (None: note the digest before a frame)."""
        if self._hashing is None and not self._unhashed and (
                data is None or len(data) < HASH_IN_THREAD_BYTES):
            if data is None:
                self.digest_before_frame = self.received_digest.copy()
            else:
                self.received_digest.update(data)
            return
        self._unhashed.append(data)
        if self._hashing is None:
            self._start_hashing()

    def _start_hashing(self) -> None:
        items, self._unhashed = self._unhashed, []
        done = self._hashing = trio.Event()
        token = trio.lowlevel.current_trio_token()
        digest = self.received_digest

        def work() -> None:
            for item in items:
                if item is None:
                    self.digest_before_frame = digest.copy()
                else:
                    digest.update(item)

        def finished(result: Any) -> None:  # an outcome.Outcome
            try:
                result.unwrap()
            except Exception as e:  # pragma: no cover - hashing bytes does not fail
                self._hash_error = e
            self._hashing = None
            done.set()
            if self._unhashed:
                self._start_hashing()

        def deliver(result: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished, result)

        trio.lowlevel.start_thread_soon(work, deliver)

    async def hashed(self) -> None:
        """Wait until everything received so far is in the digest (and no worker
        thread reads a received buffer any more: call it, shielded, before guest RAM
        goes away)."""
        while self._hashing is not None:
            await self._hashing.wait()
        if self._hash_error is not None:
            raise MigrationError(f"cannot hash the stream: {self._hash_error}")

    async def _receive_some(self, size: int, what: str) -> bytes:
        try:
            chunk = await self.stream.receive_some(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise MigrationError(f"the migration stream broke in {what}: "
                                 f"{_why(e)}") from None
        if not chunk:
            raise MigrationError(f"the migration stream ended in {what}")
        return chunk


class PeerError(MigrationError):
    """The other side sent ERROR: its line is the message."""


def _why(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
