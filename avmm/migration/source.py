"""The source side of a migration (``vm.migrate``): pre-copy, stop-and-copy, hand-over.

1. Connect, send the header and the VM's config; the destination builds the same
   machine and answers READY (or ERROR: refused, nothing changed here).
2. Dirty logging on (:class:`avmm.migration.dirty.DirtyLog`: KVM's log, avmm's own
   writes, each added source), then all of RAM (round 0) while the guest runs.
3. Rounds: collect the pages dirtied meanwhile and send them, until the time to send
   what is dirty, at the rate the last round achieved, fits ``downtime_ms`` — or
   ``max_rounds``/``timeout_s`` is reached: then ``on_timeout="pause"`` goes on to 4
   anyway, ``"abort"`` gives up (the guest runs on here).
4. SYNC: wait until the destination has caught up with what was sent (the guest
   still runs). Pause the VM (vCPUs parked, devices stopped, vhost-user rings handed
   back), send the last dirty pages, the device and vCPU state (the snapshot's
   sections) and END with the stream's SHA-256; wait for the destination's ACK, send
   COMMIT, wait for STARTED (the guest runs there) and stop the VM with
   :attr:`~avmm.lifecycle.StopReason.MIGRATED`.

Any failure before COMMIT is sent (the stream cut, an ERROR from the destination, a
timeout, a cancellation), and an ERROR answering COMMIT (the destination could not
start the guest), turns dirty logging off and resumes the VM if it was paused here: the
guest runs on as if nothing had happened, and the destination discards what it got.
No answer to COMMIT (the stream cut, a timeout, a destination that died) leaves the
outcome unknown: the VM stays paused here, never resumed by itself (the guest may run
there) and never lost (``resume`` it once the destination is known not to run it);
the migration's state is then ``unconfirmed``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..concurrency import run_together
from ..errors import AvmmError
from ..state.format import build_state
from .destination import prepare_state_codec
from .errors import HandOverUnconfirmed, MigrationError
from .pages import PageMap
from .progress import MigrationProgress, Steps
from .stream import MAX_FRAME_PAGES, PAGE_SIZE, ROUND, Channel, Kind, PeerError, pages_head
from .transport import Address, adopt, connect

if TYPE_CHECKING:
    from ..vm import VirtualMachine

log = structlog.get_logger(__name__)

#: The longest wait for the connection and the destination's READY (it builds the
#: machine first), and for its ACK once everything is sent (it loads the state).
HANDSHAKE_TIMEOUT_S = 120.0
#: The longest the guest stays paused for the stop-and-copy before the source gives up
#: and lets it run on: a destination that stops reading must not freeze it for good.
STOP_AND_COPY_TIMEOUT_S = 120.0
#: The longest wait for the destination's STARTED after COMMIT (it only starts the
#: vCPUs and device tasks of a machine already loaded).
STARTED_TIMEOUT_S = 30.0
ON_TIMEOUT = ("pause", "abort")
#: A round that sent less than this says little about the stream's rate.
RATE_MIN_BYTES = 4 << 20
#: Dirty pages few enough that another pre-copy round would not shorten the downtime
#: by much (a millisecond or so at the rates a unix socket or a LAN reach).
SMALL_ENOUGH_PAGES = 256
#: A frame of at most this many pages is read on the event loop (some microseconds a
#: page), not in a worker thread.
INLINE_FRAME_PAGES = 16
#: How often progress is reported while pages are sent.
PROGRESS_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Options:
    downtime_ms: int = 300
    on_timeout: str = "pause"
    max_rounds: int = 30
    timeout_s: float | None = None

    def check(self) -> None:
        if not isinstance(self.downtime_ms, int) or not 1 <= self.downtime_ms <= 3_600_000:
            raise MigrationError("downtime_ms must be an integer, 1..3600000")
        if self.on_timeout not in ON_TIMEOUT:
            raise MigrationError(f"on_timeout must be one of {', '.join(ON_TIMEOUT)}, "
                                 f"not {self.on_timeout!r}")
        if not isinstance(self.max_rounds, int) or not 1 <= self.max_rounds <= 10_000:
            raise MigrationError("max_rounds must be an integer, 1..10000")
        if self.timeout_s is not None and not (isinstance(self.timeout_s, int | float)
                                               and 0 < self.timeout_s < math.inf):
            raise MigrationError("timeout_s must be a positive number of seconds")


#: A PAGES frame ready to send: its header, head (runs), data, and pages covered.
_Frame = tuple[bytes, bytes, memoryview, int]


class _Converged(Exception):
    """The pre-copy rounds are over (internal)."""


def make_dirty_log(vm: VirtualMachine) -> Any:
    """The VM's dirty log (KVM's log and avmm's own marks; each vhost-user device's log
    added as a source)."""
    from .dirty import DirtyLog

    memory = vm.memory
    assert memory is not None
    # avmm registers KVM memory slot i for memory.regions[i] (VirtualMachine._build).
    return DirtyLog(vm._kvm_vm, memory, slots=enumerate(memory.regions))


class Source:
    """One outgoing migration of ``vm`` (see the module docstring)."""

    def __init__(self, vm: VirtualMachine, address: Address, options: Options,
                 report: Callable[[MigrationProgress], None], *,
                 connected: socket.socket | None = None) -> None:
        self.vm = vm
        self.address = address
        #: A connection to ``address`` made by someone else (a jailed worker's daemon),
        #: used instead of connecting (then closed with the migration).
        self._connected = connected
        self.options = options
        self._report = report
        assert vm.memory is not None
        self.pages = PageMap(vm.memory)
        self._started = time.monotonic()
        self.progress = MigrationProgress(state="setup", address=str(address),
                                          pages_total=self.pages.total)
        self._channel: Channel | None = None
        self._pending_before_pause: Any = None
        self._backends: list[Any] = []  # vhost-user devices whose logs are on
        self._frame_buffers: tuple[memoryview, memoryview] | None = None
        self._log = log.bind(vm=vm.name, to=str(address))

    def _update(self, **changes: Any) -> None:
        channel = self._channel
        self.progress = replace(self.progress, total_ms=self._elapsed_ms(),
                                bytes_sent=channel.bytes_sent if channel else 0, **changes)
        self._report(self.progress)

    def _elapsed_ms(self) -> float:
        return round((time.monotonic() - self._started) * 1000, 1)

    async def run(self) -> MigrationProgress:
        self._update()
        stream = None
        dirty_log = None
        paused_here = False
        committed = False
        downtime: float | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                if self._connected is not None:
                    stream = adopt(self._connected)
                    self._connected = None
                else:
                    stream = await connect(self.address, self.vm._paths)
                channel = self._channel = Channel(stream)
                await channel.send_header()
                await channel.send(Kind.CONFIG, self.vm._migration_config())
                kind, _ = await channel.receive()
                if kind is not Kind.READY:
                    raise MigrationError(f"the destination answered {kind.name}, not READY")
            await trio.to_thread.run_sync(prepare_state_codec)
            dirty_log = make_dirty_log(self.vm)
            await trio.to_thread.run_sync(dirty_log.start)
            await self._start_backend_logs(dirty_log)
            self._log.info("migration started", pages=self.pages.total)
            self._update(state="precopy")
            await self._precopy(channel, dirty_log)
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await self._sync(channel)
            # Stop-and-copy: the guest is paused from here until the hand-over, or
            # until a failure lets it run on.
            paused_at = time.monotonic()
            await self.vm._migration_pause()
            paused_here = True
            steps = Steps(paused_at)
            steps.mark("pause")
            with trio.fail_after(STOP_AND_COPY_TIMEOUT_S):
                # What the last pre-copy round left dirty, and what was dirtied since.
                dirty = self._pending_before_pause
                dirty |= await trio.to_thread.run_sync(dirty_log.collect)
                # The back-ends' logging goes off now: their state, saved next, must
                # not carry it. KVM's stays on until the hand-over is over (turning it
                # off rewrites every memory slot, and the state holds nothing of it).
                await self._stop_backend_logs()
                self._update(state="stop-and-copy", round=self.progress.round + 1,
                             pages_dirty=len(dirty))
                steps.mark("collect")
                # The device and vCPU state (fixed while paused) is taken and encoded
                # while the last pages go: the encoding is Python work, the sending
                # mostly kernel copies and hashing that let go of the GIL.
                state: list[bytes] = []
                failed: list[Exception] = []

                async def encode_state() -> None:
                    try:
                        sections = await self.vm._migration_state()
                        # Here, not in a worker: it is a fraction of a millisecond now
                        # (avmm.state._writer), less than the hop to a thread.
                        state.append(build_state(sections))
                    except Exception as e:
                        # Raised once the last pages are out: never cuts a frame.
                        failed.append(e)

                async def last_pages() -> None:
                    await self._send_round(channel, dirty.runs())
                    steps.mark("pages")

                await run_together(encode_state, last_pages)
                if failed:
                    raise failed[0]
                await channel.send(Kind.STATE, state[0])
                await channel.send(Kind.END, _end(channel, self.progress.pages_sent))
                steps.mark("state")
                kind, _ = await channel.receive()
                steps.mark("ack")
                if kind is not Kind.ACK:
                    raise MigrationError(f"the destination answered {kind.name}, not ACK")
                # After this frame the destination may run the guest. A send that
                # fails never delivered it (the destination then discards everything):
                # the except clause below resumes the guest here as for any failure.
                await channel.send(Kind.COMMIT)
                committed = True
            downtime = round((time.monotonic() - paused_at) * 1000, 1)
            # The destination answers STARTED once the guest runs there, or ERROR when
            # it could not start it (no vCPU ran: the except clause resumes it here).
            # Anything else leaves the outcome unknown: the guest may run there, so it
            # is never resumed here by itself, and stays paused (not lost) for the
            # operator, who can see which side has it.
            unknown = await _await_started(channel)
            with trio.CancelScope(shield=True):
                await self._stop_logs(dirty_log)
            dirty_log = None
            if unknown is not None:
                raise HandOverUnconfirmed(
                    f"the hand-over to {self.address} is unconfirmed ({unknown}): the "
                    "guest stays paused here; resume it only if it does not run there")
            self._update(state="completed", downtime_ms=downtime)
            self.vm._migration_handover(f"migrated to {self.address}")
            self._log.info("migration completed", rounds=self.progress.round,
                           pages_sent=self.progress.pages_sent,
                           bytes_sent=self.progress.bytes_sent, downtime_ms=downtime,
                           total_ms=self.progress.total_ms,
                           last_round_pages=self.progress.pages_dirty,
                           downtime_steps_ms=steps.ms)
            return self.progress
        except HandOverUnconfirmed as e:
            self._update(state="unconfirmed", downtime_ms=downtime, error=str(e))
            self._log.error("migration unconfirmed; the VM stays paused here", error=str(e))
            raise
        except BaseException as e:
            error = _failure(e)
            if committed and not isinstance(e, PeerError):
                # COMMIT went out and the destination did not say it refused (a
                # cancellation, or logging that would not stop): the guest may run
                # there, so it stays paused here, as when STARTED does not come.
                with trio.CancelScope(shield=True):
                    if dirty_log is not None:
                        await self._stop_logs(dirty_log)
                why = (f"the hand-over to {self.address} is unconfirmed ({error}): the "
                       "guest stays paused here; resume it only if it does not run there")
                self._update(state="unconfirmed", downtime_ms=downtime, error=why)
                self._log.error("migration unconfirmed; the VM stays paused here",
                                error=why)
                if isinstance(e, Exception):
                    raise HandOverUnconfirmed(why) from e
                raise
            with trio.CancelScope(shield=True):
                if dirty_log is not None:
                    await self._stop_logs(dirty_log)
                if self._channel is not None and not isinstance(e, PeerError):
                    with trio.move_on_after(1):
                        try:
                            await self._channel.send_error(f"the source gave up: {error}")
                        except MigrationError:
                            pass
                if paused_here:
                    await self.vm._migration_resume()
            self._update(state="failed", error=error)
            self._log.warning("migration failed; the VM runs on here", error=error)
            if isinstance(e, MigrationError):
                raise
            if isinstance(e, trio.TooSlowError):
                raise MigrationError(error) from None
            raise
        finally:
            self._release_buffers()
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _sync(self, channel: Channel) -> None:
        """Wait until the destination has stored and hashed everything sent so far
        (SYNC, SYNCED), with the guest still running: otherwise the pause would wait for
        that too (SHA-256 of the last round's data, the bytes still in the socket
        buffers). Pages the guest dirties meanwhile go in the stop-and-copy round."""
        await channel.send(Kind.SYNC)
        kind, _ = await channel.receive()
        if kind is not Kind.SYNCED:
            raise MigrationError(f"the destination answered {kind.name}, not SYNCED")

    async def _start_backend_logs(self, dirty_log: Any) -> None:
        """Each vhost-user back-end logs its writes into a log of its own, merged by
        ``dirty_log.collect`` (the guest RAM pages its rings write behind our back)."""
        from ..vhost.frontend import VhostUserDevice

        memory = self.vm.memory
        assert memory is not None
        for slot in self.vm.virtio_slots:
            device = slot.device
            if isinstance(device, VhostUserDevice):
                self._backends.append(device)
                try:
                    await device.start_dirty_log(memory.size)
                except AvmmError as e:
                    raise MigrationError(f"{device.name}: cannot start the back-end's "
                                         f"dirty log: {e}") from None
                dirty_log.add_source(device.collect_dirty)

    async def _stop_logs(self, dirty_log: Any) -> None:
        """Dirty logging off everywhere (never raises: it runs after failures too)."""
        await self._stop_backend_logs()
        await trio.to_thread.run_sync(_stop_quietly, dirty_log)

    async def _stop_backend_logs(self) -> None:
        for device in self._backends:
            await device.stop_dirty_log()
        self._backends.clear()

    async def _precopy(self, channel: Channel, dirty_log: Any) -> None:
        options = self.options
        deadline = (trio.current_time() + options.timeout_s
                    if options.timeout_s is not None else math.inf)
        budget_s = options.downtime_ms / 1000
        runs: Iterable[tuple[int, int]] = [(0, self.pages.total)]  # round 0: all of RAM
        pending_count = self.pages.total
        previous_count = math.inf
        round_number = 0
        rate = 0.0
        while True:
            self._update(round=round_number, pages_dirty=pending_count)
            started, sent_before = time.monotonic(), channel.bytes_sent
            # A round is never cut short: a page left out would never be sent again.
            await self._send_round(channel, runs)
            elapsed = time.monotonic() - started
            rate = _rate(channel.bytes_sent - sent_before, elapsed, rate)
            self._update(rate_bytes_s=round(rate, 1))
            dirty = await trio.to_thread.run_sync(dirty_log.collect)
            runs, pending_count = dirty.runs(), len(dirty)
            self._log.debug("pre-copy round sent", round=round_number,
                            ms=round(elapsed * 1000, 1), rate_mb_s=round(rate / 1e6, 1),
                            pages_dirty=pending_count)
            if _converged(pending_count, previous_count, rate, budget_s):
                break
            previous_count = pending_count
            round_number += 1
            out_of_time = trio.current_time() >= deadline
            if round_number >= options.max_rounds or out_of_time:
                why = "timeout_s" if out_of_time else f"{options.max_rounds} rounds"
                if options.on_timeout == "abort":
                    raise MigrationError(
                        f"did not converge within {why} ({pending_count} pages still "
                        f"dirty, {rate / 1e6:.1f} MB/s); on_timeout=\"abort\": the VM runs "
                        "on here")
                self._log.info("migration not converging; pausing", reason=why,
                               pages_dirty=pending_count)
                break
        # The stop-and-copy round sends what is dirty then (these pages included).
        self._pending_before_pause = dirty

    async def _send_round(self, channel: Channel, runs: Iterable[tuple[int, int]]) -> None:
        """Send the pages of ``runs`` ((first, count), ascending); a ROUND marker first.

        A worker thread reads (and zero-checks) each frame's pages into one of two
        buffers and hashes it, while the event loop sends the frame before: the guest
        RAM is copied once, and the loop never touches it."""
        progress = self.progress
        await channel.send(Kind.ROUND, ROUND.build({"round": progress.round,
                                                    "pages_dirty": progress.pages_dirty}))
        sending, ready = trio.open_memory_channel[_Frame | Exception](0)
        sent = progress.pages_sent
        last_report = time.monotonic()

        async def read_frames() -> None:
            async with sending:
                try:
                    buffers = self._buffers()
                    for index, frame in enumerate(self.pages.frames(runs)):
                        if not self.vm._migration_running():
                            return  # send_frames says why
                        if sum(count for _, count in frame) <= INLINE_FRAME_PAGES:
                            # A few pages (the stop-and-copy's, often): copying and
                            # hashing them costs less than the hop to a worker thread.
                            item = self._read_frame(channel, frame, buffers[index & 1])
                        else:
                            item = await trio.to_thread.run_sync(
                                self._read_frame, channel, frame, buffers[index & 1])
                        await sending.send(item)
                except Exception as e:
                    # Raised by send_frames between two frames: a failure here must not
                    # cut a frame in the middle (the ERROR frame that follows would be
                    # read as its data).
                    await sending.send(e)

        async def send_frames() -> None:
            nonlocal sent, last_report
            async with ready:
                async for item in ready:
                    if isinstance(item, Exception):
                        raise item
                    self._check_running()
                    header, head, data, pages = item
                    await channel.send_hashed(header, head, data)
                    sent += pages
                    self.progress = replace(self.progress, pages_sent=sent)
                    if time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
                        last_report = time.monotonic()
                        self._update()
            self._check_running()  # read_frames stops early for a VM that stops

        await run_together(read_frames, send_frames)
        self._update(pages_sent=sent)

    def _check_running(self) -> None:
        if not self.vm._migration_running():
            raise MigrationError(f"VM {self.vm.name!r} stopped during the migration")

    def _buffers(self) -> tuple[memoryview, memoryview]:
        """Two frame buffers, kept for the whole migration (a fresh one per frame
        would cost a page fault per page). Anonymous mappings, not bytearrays: nothing
        touches their pages until data lands there, and huge pages where the kernel
        gives them make that a handful of faults."""
        if self._frame_buffers is None:
            self._frame_buffers = (_frame_buffer(), _frame_buffer())
        return self._frame_buffers

    def _release_buffers(self) -> None:
        buffers, self._frame_buffers = self._frame_buffers, None
        for view in buffers or ():
            mapping = view.obj
            view.release()
            # A slice still held (a traceback's frame) keeps it to the garbage collector.
            with contextlib.suppress(BufferError):
                mapping.close()  # type: ignore[union-attr]

    def _read_frame(self, channel: Channel, frame: list[tuple[int, int]],
                    buffer: memoryview) -> _Frame:
        """In a worker thread: a PAGES frame's header, head and data, hashed into the
        stream's digest (frames are read and sent in the same order, one at a time)."""
        runs, used = self.pages.read_frame(frame, buffer)
        head = pages_head(runs)
        header = channel.frame_header(Kind.PAGES, len(head) + used)
        data = buffer[:used]
        digest = channel.sent_digest
        digest.update(header)
        digest.update(head)
        digest.update(data)
        return header, head, data, sum(count for _, count in frame)


def _frame_buffer() -> memoryview:
    buffer = mmap.mmap(-1, MAX_FRAME_PAGES * PAGE_SIZE)
    with contextlib.suppress(OSError, AttributeError):  # only a hint
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(buffer)


def _rate(sent: int, elapsed: float, previous: float) -> float:
    """Bytes per second to expect of the next round: what this round achieved, unless
    it sent too little to tell (its fixed costs, not the stream, set its time; most of
    its pages zeros): then the last estimate stands."""
    if elapsed <= 0 or (sent < RATE_MIN_BYTES and previous > 0):
        return previous
    return sent / elapsed


def _converged(pending: int, previous: float, rate: float, budget_s: float) -> bool:
    """Pre-copy is over: what is dirty fits the downtime budget at ``rate`` (each page
    counted as data: zero pages only make it faster), and another round would not
    shrink it much: it is already small, or the last round did not halve it (the guest
    dirties about as fast as the stream sends)."""
    if pending == 0:
        return True
    if rate <= 0 or pending * PAGE_SIZE / rate > budget_s:
        return False
    return pending <= SMALL_ENOUGH_PAGES or pending * 2 > previous


def _end(channel: Channel, pages_sent: int) -> bytes:
    from .stream import END

    return END.build({"pages_sent": pages_sent, "sha256": channel.sent_digest.digest()})


def _stop_quietly(dirty_log: Any) -> None:
    try:
        dirty_log.stop()
    except Exception as e:  # logging off is best effort after a failure
        log.warning("dirty logging could not be turned off", error=str(e))


async def _await_started(channel: Channel) -> str | None:
    """The destination's answer to COMMIT: None once it says STARTED. An ERROR (it
    could not start the guest; no vCPU ran there) raises :class:`PeerError`; anything
    else returns why the outcome is unknown."""
    try:
        with trio.fail_after(STARTED_TIMEOUT_S):
            kind, _ = await channel.receive()
    except PeerError:
        raise
    except trio.TooSlowError:
        return f"no answer to COMMIT within {STARTED_TIMEOUT_S:.0f} s"
    except (MigrationError, OSError) as e:
        return str(e) or type(e).__name__
    if kind is not Kind.STARTED:
        return f"the destination answered {kind.name}, not STARTED"
    return None


def _failure(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "the destination did not answer in time"
    if isinstance(error, trio.Cancelled):
        return "cancelled"
    if isinstance(error, PeerError):
        return str(error)  # the destination's own line says who refused
    return str(error) or type(error).__name__
