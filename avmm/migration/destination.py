"""The destination side of a migration (``VirtualMachine.receive``).

Accept one connection; read the header and the config (the one given here, if any,
must describe the same devices in the same order: see :func:`merge_config`); build the
machine (no kernel: RAM and state come by the stream) and answer READY; store each
batch of pages; answer SYNC with SYNCED once everything before it is stored and hashed;
load the device and vCPU state; check END's SHA-256 against the stream
received; start the machine parked (device tasks and vCPU threads, every vCPU parked
before its first KVM_RUN, restored devices paused: see ``VirtualMachine._start_built``);
answer ACK (or ERROR if it could not start); wait for COMMIT and only then let the guest
run (``VirtualMachine._hand_over``); answer STARTED (or ERROR if it could not: no vCPU
ran).

Anything wrong before COMMIT — a cut stream, a malformed or out-of-order frame, a page
outside RAM, a state that does not fit, a digest that does not match, no COMMIT in
time, a stop — sends ERROR to the source (best effort), releases everything built (the
parked machine's threads end without running the guest), and ends the VM with
:attr:`~avmm.lifecycle.StopReason.ERROR` and a detail saying why: it never ran.

A jailed worker's daemon reads the opening (header and CONFIG) itself when it has no
config to plan the jail from (:func:`receive_opening`); the worker's destination then
reads those bytes again, first (:class:`~avmm.migration.transport.Accepted`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..config import PathCheck, VmConfig
from ..errors import AvmmError, VmStartError
from ..state import MachineState, SnapshotError, prepare_restore
from ..state.codec import decode, prepare
from ..state.format import parse_state
from ..state.vm_state import (
    ConfigState,
    LegacyDevicesState,
    VirtioDevicesState,
    config_from_state,
)
from .errors import MigrationError
from .pages import PageMap
from .progress import MigrationProgress, Steps
from .stream import (
    END,
    KIND_DATA,
    MAX_FRAME,
    PAGES_COUNT,
    ROUND,
    Channel,
    Kind,
    PeerError,
    check_pages_length,
    parse_runs,
    runs_length,
)
from .transport import Accepted, Listener, StreamWrapper

if TYPE_CHECKING:
    from ..vm import VirtualMachine

log = structlog.get_logger(__name__)

#: The sections of the STATE frame: the snapshot's, less the config (sent first).
STATE_SECTIONS: dict[str, Any] = {
    "machine": MachineState,
    "devices": LegacyDevicesState,
    "virtio": VirtioDevicesState,
}
#: The longest wait for COMMIT once ACK is sent: no COMMIT means the source kept the
#: guest (or died); this side must then never run it.
COMMIT_TIMEOUT_S = 60.0
#: The longest the answer to COMMIT may take to send (best effort: see
#: :meth:`Destination._answer_commit`).
ANSWER_TIMEOUT_S = 5.0
STREAM_NAME = "the migration stream"


def prepare_state_codec() -> None:
    """Make the codec's plans for the STATE frame's types now (milliseconds, the first
    time in a process), not while the guest is paused (both sides; a worker thread)."""
    for hint in STATE_SECTIONS.values():
        prepare(hint)


class Destination:
    """One incoming migration into ``vm`` (see the module docstring)."""

    def __init__(self, vm: VirtualMachine, listener: Listener | Accepted,
                 config: VmConfig | None, report: Any,
                 adjust: Callable[[VmConfig], VmConfig] | None = None) -> None:
        self.vm = vm
        self.listener = listener
        self.given = config
        #: Changes the config to build before it is built (a jailed worker's: see
        #: avmm.isolation.worker); it may refuse it (an AvmmError).
        self._adjust = adjust
        self._report = report
        self._started = time.monotonic()
        self.progress = MigrationProgress(state="incoming", address=str(listener.address))
        self.receiving = trio.CancelScope()
        #: The wait for COMMIT, once the machine has started parked (outside
        #: ``receiving``: the VM's nursery, entered in between, must outlive it); a stop
        #: cancels it as it cancels ``receiving`` before (the VM's ``_receiving``).
        self.awaiting_commit = trio.CancelScope()
        self._channel: Channel | None = None
        #: Where the hand-over's time went here, from the STATE frame's arrival on.
        self._steps: Steps | None = None
        self._log = log.bind(vm=vm.name, listen=str(listener.address))

    def _update(self, **changes: Any) -> None:
        channel = self._channel
        self.progress = replace(
            self.progress, total_ms=round((time.monotonic() - self._started) * 1000, 1),
            bytes_sent=channel.bytes_received if channel else 0, **changes)
        self._report(self.progress)

    async def run(self) -> None:
        """Receive, then run the VM until it stops (the task owning its nursery)."""
        structlog.contextvars.bind_contextvars(vm=self.vm.name)
        vm = self.vm
        stream = None
        try:
            try:
                with self.receiving:
                    stream = await self.listener.accept_one()
                    self._log.info("migration incoming")
                    await self._receive(stream)
            except BaseException as e:
                await self._fail(_describe(e), refuse=not isinstance(e, PeerError),
                                 told=_told(e))
                if isinstance(e, AvmmError | OSError | trio.TooSlowError):
                    return
                raise
            finally:
                self.listener.close()
            if self.receiving.cancelled_caught:
                await self._fail("the VM was stopped before the hand-over", refuse=True)
                return
            # The state is loaded. The machine starts now, parked, before ACK: what a
            # start costs (device tasks, one thread per vCPU, its scheduling: 1.5-8 ms
            # on a loaded host) is then no longer between COMMIT and the guest's first
            # instruction, the downtime the guest sees. Before ACK rather than after
            # it: a start that fails is still a plain refusal (ERROR instead of ACK, the
            # source runs on), never a COMMIT to answer with ERROR; the threads are made
            # and scheduled by the VM's tasks while ACK travels and COMMIT comes back.
            try:
                await vm._start_built(parked=True)
            except BaseException as e:
                await self._cannot_start(e, committed=False)
                if isinstance(e, AvmmError | OSError):
                    return
                raise
            self._mark("start")
            # From here the VM's nursery is open in this task: every way out before the
            # hand-over ends the VM through _fail_started (its vCPUs never ran).
            try:
                # stop() now cancels this wait (it cancelled `receiving` before).
                vm._receiving = self.awaiting_commit
                if vm._latch.requested:
                    self.awaiting_commit.cancel()  # a stop that came in between
                with self.awaiting_commit:
                    await self._await_commit()
            except BaseException as e:
                await self._fail_started(_describe(e), refuse=not isinstance(e, PeerError))
                if isinstance(e, AvmmError | OSError | trio.TooSlowError):
                    return
                raise
            if self.awaiting_commit.cancelled_caught:
                # Stopped by its owner, or by a vCPU thread that could not be placed.
                stopped = vm._latch.exit
                await self._fail_started(
                    f"the VM stopped before the hand-over: {stopped.detail}"
                    if stopped is not None and stopped.failed
                    else "the VM was stopped before the hand-over", refuse=True)
                return
            # COMMIT received: the guest is ours to run.
            try:
                await vm._hand_over()
            except BaseException as e:
                if vm._handed_over:
                    # The vCPUs were let go (the failure came after): the guest runs
                    # here, and the source must not run it too.
                    await self._answer_commit(error=None)
                    raise
                await self._cannot_start(e, committed=True)
                if isinstance(e, AvmmError | OSError):
                    return
                raise
            self._mark("resume")
            # The guest runs here from now on, whether or not the source hears it.
            await self._answer_commit(error=None)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        self._update(state="completed")
        self._log.info("migration received; the VM runs here",
                       pages=self.progress.pages_sent, total_ms=self.progress.total_ms,
                       handover_steps_ms=self._steps.ms if self._steps else None)
        try:
            await vm.wait()
        finally:
            await vm.__aexit__(None, None, None)

    async def _cannot_start(self, error: BaseException, *, committed: bool) -> None:
        """The VM could not start (parked, before ACK) or be let go (after COMMIT): no
        vCPU ran, so the source may run the guest on. It is told with ERROR, in place of
        ACK or as the answer to COMMIT; the VM ends, everything released."""
        why = f"the VM could not start: {error}"
        await self._mark_failed(why, refuse=not committed)
        detail = f"incoming migration: {why}"
        try:
            if self.vm._stack is not None:
                # Started parked (the failure is the hand-over's): its threads end
                # unrun, and its devices stop (a hand-over that failed after resuming
                # slots may have set them serving) before the source hears it may run
                # the guest on: it then shares the disks with nothing of this side.
                await self.vm._end_parked(detail)
        finally:
            # Also when the ending raised or was cancelled: the VM's nursery has
            # waited for its tasks and threads all the same, and no vCPU ran.
            if committed:
                await self._answer_commit(error=f"the destination refused: {why}")
        # (A start that failed has released what it built.) Stopped, never run.
        self.vm._migration_failed(detail)

    async def _refuse(self, why: str) -> None:
        """ERROR to the source, best effort (at most 1 s, also while cancelled)."""
        if self._channel is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self._channel.send_error(why)
            except MigrationError:
                pass

    async def _answer_commit(self, *, error: str | None) -> None:
        """STARTED (or ERROR) to the source, best effort: a source that does not hear
        it keeps the guest paused there, never running."""
        assert self._channel is not None
        with trio.CancelScope(shield=True), trio.move_on_after(ANSWER_TIMEOUT_S):
            try:
                if error is None:
                    await self._channel.send(Kind.STARTED)
                else:
                    await self._channel.send_error(error)
            except MigrationError as e:
                self._log.warning("the source did not get the answer to COMMIT",
                                  error=str(e))

    async def _fail(self, why: str, *, refuse: bool, told: str | None = None) -> None:
        """The migration failed (``why``); with ``refuse``, the source is told ``told``
        (``why`` if None)."""
        if self.progress.state == "failed":
            return
        with trio.CancelScope(shield=True):
            await self._mark_failed(why, refuse=refuse, told=told)
            # Release what was built (in a worker: unmapping RAM, closing back-ends).
            # The vCPUs leave the VM's list first, here on the event loop: a stop
            # requested meanwhile (the embedder leaving receive()) kicks the vCPUs it
            # lists, and must never touch one the worker is closing.
            self.vm._vcpus.clear()
            await trio.to_thread.run_sync(self.vm._resources.close)
            self.vm._migration_failed(f"incoming migration failed: {why}")

    async def _fail_started(self, why: str, *, refuse: bool) -> None:
        """As :meth:`_fail`, once the machine has started parked: the VM is stopped (its
        parked vCPUs leave without running the guest) and released in this task (also
        when the migration was already marked failed: the machine must end)."""
        if self.progress.state != "failed":
            with trio.CancelScope(shield=True):
                await self._mark_failed(why, refuse=refuse)
        await self.vm._end_parked(f"incoming migration failed: {why}")

    async def _mark_failed(self, why: str, *, refuse: bool, told: str | None = None) -> None:
        """Mark the migration failed, tell the source (with ``refuse``: ``told``, or
        ``why`` if None), and wait until no worker thread reads the stream into guest
        RAM (which the caller is about to release)."""
        self._update(state="failed", error=why)
        self._log.warning("incoming migration failed; nothing runs here", error=why)
        if refuse:
            await self._refuse(f"the destination refused: {told or why}")
        if self._channel is not None:
            with contextlib.suppress(MigrationError):
                await self._channel.hashed()

    async def _receive(self, stream: trio.abc.Stream) -> None:
        vm = self.vm
        channel = self._channel = Channel(stream)
        config = await receive_config(channel, self.given, path_check=vm._paths.check)
        if self._adjust is not None:
            config = self._adjust(config)
        self._update(state="receiving")
        vm._prepare_incoming(config)
        await trio.to_thread.run_sync(vm._build)
        if vm._after_build is not None:
            # A jailed worker drops its privileges here: before the first page.
            vm._after_build()
        await trio.to_thread.run_sync(self._prepare_restore)
        assert vm.memory is not None
        pages = PageMap(vm.memory)
        self._update(pages_total=pages.total)
        await channel.send(Kind.READY)
        received = 0
        state: dict[str, Any] | None = None
        while True:
            kind, length = await channel.receive_frame_header()
            if kind is Kind.STATE and self._steps is None:
                # The last pages are in: from here the source's guest is paused.
                self._steps = Steps()
            if kind is Kind.PAGES:
                if state is not None:
                    raise MigrationError("PAGES frame after the STATE frame")
                received += await _receive_pages(channel, pages, length)
                self.progress = replace(self.progress, pages_sent=received)
                continue
            payload = await channel.receive_payload(kind, length)
            if kind is Kind.ROUND:
                try:
                    marker = ROUND.parse(payload)
                except Exception:
                    raise MigrationError("corrupt ROUND frame") from None
                self._update(round=marker.round, pages_dirty=marker.pages_dirty,
                             pages_sent=received)
            elif kind is Kind.SYNC:
                # receive_payload has waited until everything before it is hashed (and
                # so stored): the source may pause the guest now.
                if payload or state is not None:
                    raise MigrationError("corrupt or misplaced SYNC frame")
                await channel.send(Kind.SYNCED)
            elif kind is Kind.STATE:
                if state is not None:
                    raise MigrationError("a second STATE frame")
                self._mark("state_receive")
                state = _parse_state(payload)
                self._mark("state_parse")
            elif kind is Kind.END:
                await self._end(channel, payload, state, received)
                return
            else:
                raise MigrationError(f"unexpected {kind.name} frame")

    async def _end(self, channel: Channel, payload: bytes, state: dict[str, Any] | None,
                   received: int) -> None:
        self._mark("end_wait")
        try:
            end = END.parse(payload)
        except Exception:
            raise MigrationError("corrupt END frame") from None
        await channel.hashed()  # receive_payload did; digest_before_frame is final
        if end.sha256 != channel.digest_before_frame.digest():
            raise MigrationError("the stream's SHA-256 does not match what was received "
                                 "(corrupted in transit)")
        if end.pages_sent != received:
            raise MigrationError(f"END counts {end.pages_sent} pages, {received} came")
        if state is None:
            raise MigrationError("END frame before the STATE frame")
        self._mark("digest")
        try:
            await trio.to_thread.run_sync(self.vm._restore_incoming, state)
        except VmStartError as e:
            raise MigrationError(f"{e.step}: {e.error or e}") from None
        self._mark("restore")
        self._update(pages_sent=received)

    async def _await_commit(self) -> None:
        """Answer ACK, then wait for COMMIT (the machine has started parked)."""
        channel = self._channel
        assert channel is not None
        await channel.send(Kind.ACK)
        self._mark("ack")
        # The source lets go only when it has this ACK, and says so with COMMIT; without
        # COMMIT (cut, timeout) the source may run the guest on: this side must not.
        with trio.fail_after(COMMIT_TIMEOUT_S):
            kind, _ = await channel.receive()
        if kind is not Kind.COMMIT:
            raise MigrationError(f"{kind.name} frame instead of COMMIT")
        self._mark("commit")

    def _mark(self, step: str) -> None:
        if self._steps is not None:
            self._steps.mark(step)

    def _prepare_restore(self) -> None:
        """What loading the state needs that does not depend on it, done before READY
        (a worker thread): the codec's plans, what KVM offers the vCPUs."""
        prepare_state_codec()
        prepare_restore(self.vm._vcpus)


async def receive_config(channel: Channel, given: VmConfig | None,
                         path_check: PathCheck | None = None) -> VmConfig:
    """The stream's opening (see :func:`receive_config_payload`) as the config to build
    (:func:`streamed_config`, in a worker thread: it looks at the files it names)."""
    payload = await receive_config_payload(channel)
    return await trio.to_thread.run_sync(functools.partial(
        streamed_config, payload, given, path_check=path_check))


async def receive_config_payload(channel: Channel, max_bytes: int = MAX_FRAME) -> bytes:
    """The stream's opening: its header, then the CONFIG frame (of at most
    ``max_bytes``, checked before its payload is read); the frame's payload.

    :raises MigrationError: anything else came (PeerError: the source's ERROR line).
    """
    await channel.receive_header()
    kind, length = await channel.receive_frame_header()
    if kind not in (Kind.CONFIG, Kind.ERROR):
        raise MigrationError(f"{kind.name} frame before CONFIG")
    if length > max_bytes:
        raise MigrationError(f"{kind.name} frame of {length} bytes (at most {max_bytes} "
                             "here)")
    return await channel.receive_payload(kind, length)  # ERROR: raises PeerError


#: A jailed worker's daemon reads an incoming stream's opening itself (see
#: :func:`receive_opening`): a CONFIG frame of at most this many bytes (a config is a
#: few hundred bytes; what the daemon read travels to the worker in a channel message),
#: all of it within this many seconds of the connection.
OPENING_CONFIG_MAX = 32 << 10
OPENING_TIMEOUT_S = 30.0


@dataclass
class Opening:
    """A source's connection and the stream's config, read by :func:`receive_opening`."""

    stream: trio.SocketStream
    config: VmConfig
    #: Every byte received so far (the header and the CONFIG frame), in order.
    received: bytes


async def receive_opening(listener: Listener, *,
                          path_check: PathCheck | None = None,
                          max_config_bytes: int = OPENING_CONFIG_MAX,
                          timeout_s: float = OPENING_TIMEOUT_S) -> Opening:
    """For a jailed worker's daemon, which must know an incoming VM's config to plan its
    jail before the worker exists: accept the one source (within the listener's accept
    timeout; the listener is closed), read the stream's header and CONFIG frame as
    strictly as :class:`Destination` does (bounded in size and time: it is hostile input
    until then), and parse the config (:func:`streamed_config`, in a worker thread: it
    looks at the files the config names). Nothing past the CONFIG frame is read: the
    source sends nothing more before READY.

    :raises MigrationError: no source came, or its opening is not a valid one (the
        source is sent the refusal as an ERROR frame, best effort); the connection is
        closed.
    """
    stream = await listener.accept_one()
    recorded = _Recorded(stream)
    channel = Channel(recorded)
    try:
        with trio.fail_after(timeout_s):
            payload = await receive_config_payload(channel, max_config_bytes)
        config = await trio.to_thread.run_sync(functools.partial(
            streamed_config, payload, None, path_check=path_check))
    except BaseException as e:
        if isinstance(e, trio.TooSlowError):
            why = f"no config within {timeout_s:g} s of the connection"
        else:
            why = _describe(e)
        if not isinstance(e, PeerError):
            await refuse(stream, _told(e) or why)
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if isinstance(e, trio.TooSlowError):
            raise MigrationError(why) from None
        raise
    return Opening(stream, config, bytes(recorded.received))


def streamed_config(payload: bytes, given: VmConfig | None, *,
                    path_check: PathCheck | None = None) -> VmConfig:
    """The config to build from a CONFIG frame: ``given`` merged over it
    (:func:`merge_config`: the host-side choices are ``given``'s), or with no config
    given, the streamed one as the source sent it, but for what a source must not choose
    on this host: its paths must pass ``path_check`` (the daemon's ``--allow-path``
    policy, as for a config posted to the API), and its serial and console go to the
    VM's console stream, never to a file or socket the source names (it could name
    another tenant's file, which an output would truncate).

    :raises StreamedConfigError: the streamed config cannot be used here; its message
        says why (for this host's log), :attr:`~StreamedConfigError.public` what the
        source is told (nothing about this host's files)."""
    try:
        state = decode(payload, ConfigState, path="config")
        if given is not None:
            # The given config decides where the vCPUs run and how much CPU they get on
            # this host: the source's affinity may name CPUs this host lacks.
            state = replace(state, machine=replace(
                state.machine, cpu_weight=None, cpu_max_millipercent=None,
                cpu_affinity=None, vcpu_affinity=None))
        streamed = config_from_state(
            state, source=STREAM_NAME, path_check=path_check if given is None else None)
    except (SnapshotError, AvmmError) as e:
        raise StreamedConfigError(f"the streamed config: {e}") from None
    if given is None:
        return replace(streamed, serial=_to_console_stream(streamed.serial),
                       console=_to_console_stream(streamed.console))
    return merge_config(streamed, given)


class StreamedConfigError(MigrationError):
    """A streamed config this destination cannot use; the source is told only
    :attr:`public` (the message may name this host's files)."""

    public = "the streamed config cannot be used on this host (its log says why)"


def _to_console_stream(output: Any) -> Any:
    """A streamed serial or console output as a VM received without a config has it:
    its console stream instead of a file or socket the source named (none stays none)."""
    if output is None or output.mode in ("console", "none"):
        return output
    return replace(output, mode="console", path=None)


def merge_config(streamed: VmConfig, given: VmConfig) -> VmConfig:
    """The config to build on the destination: ``given``'s host-side choices (disk
    paths, taps, sockets, serial and console outputs, CPU controls and rate limits)
    over the streamed machine and everything the guest sees (vCPUs, RAM, CPU profile,
    disk ids, MACs). The devices must match in kind and order; :class:`MigrationError`
    names the first that does not."""
    where = given.source or "the destination's config"

    def refuse(what: str) -> MigrationError:
        return MigrationError(f"{where}: {what} does not match the migrating VM's")

    if given.machine.vcpus != streamed.machine.vcpus:
        raise refuse("machine.vcpus")
    if given.machine.memory_mib != streamed.machine.memory_mib:
        raise refuse("machine.memory_mib")
    if len(given.disks) != len(streamed.disks):
        raise refuse("the number of disks")
    disks = []
    for index, (mine, theirs) in enumerate(zip(given.disks, streamed.disks, strict=True)):
        if (mine.vhost_user is None) != (theirs.vhost_user is None):
            raise refuse(f"disk[{index}] (vhost-user or not)")
        if mine.readonly != theirs.readonly:
            raise refuse(f"disk[{index}].readonly")
        disks.append(replace(mine, id=theirs.id))
    if len(given.nets) != len(streamed.nets):
        raise refuse("the number of NICs")
    nets = []
    for index, (mine, theirs) in enumerate(zip(given.nets, streamed.nets, strict=True)):
        if (mine.vhost_user is None) != (theirs.vhost_user is None):
            raise refuse(f"net[{index}] (vhost-user or not)")
        nets.append(replace(mine, mac=theirs.mac))
    if [(v.device_id, v.num_queues, v.queue_size) for v in given.vhost_users] != \
            [(v.device_id, v.num_queues, v.queue_size) for v in streamed.vhost_users]:
        raise refuse("the vhost_user devices")
    if (given.rng is None) != (streamed.rng is None):
        raise refuse("rng")
    if (given.console is None) != (streamed.console is None):
        raise refuse("console")
    cpu = given.machine
    machine = replace(streamed.machine, cpu_weight=cpu.cpu_weight,
                      cpu_max_percent=cpu.cpu_max_percent, cpu_affinity=cpu.cpu_affinity,
                      vcpu_affinity=cpu.vcpu_affinity)
    return replace(given, machine=machine, boot=streamed.boot,
                   disks=tuple(disks), nets=tuple(nets))


async def refuse(stream: trio.abc.Stream, why: str) -> None:
    """Tell the source why this destination refuses (an ERROR frame; best effort, at
    most 1 s, also while cancelled)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1), \
            contextlib.suppress(MigrationError):
        await Channel(stream).send_error(f"the destination refused: {why}")


class _Recorded(StreamWrapper):
    """A stream that keeps a copy of every byte received through it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.received = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        chunk = await self._stream.receive_some(max_bytes)
        self.received += chunk
        return chunk


async def _receive_pages(channel: Channel, pages: PageMap, length: int) -> int:
    """Receive one PAGES frame of ``length`` bytes: its runs first, all of them checked
    before any byte goes into guest RAM, then each data run's pages straight into guest
    RAM. Returns how many pages it covered."""
    check_pages_length(length)
    count = await channel.receive_exactly(PAGES_COUNT.size, what="a PAGES frame")
    head = await channel.receive_exactly(runs_length(count, length), what="a PAGES frame")
    runs = parse_runs(head, length, pages.total)
    covered = 0
    for first, run_pages, kind in runs:
        covered += run_pages
        if kind == KIND_DATA:
            for view in pages.data_views(first, run_pages):
                await channel.receive_into(view, what="a PAGES frame")
        else:
            pages.store_zeros(first, run_pages)
    return covered


def _parse_state(payload: bytes) -> dict[str, Any]:
    try:
        return parse_state(payload, STATE_SECTIONS, name="the streamed state")
    except SnapshotError as e:
        raise MigrationError(str(e)) from None


def _told(error: BaseException) -> str | None:
    """What the source is told of ``error`` when it must not hear the whole line (it
    may name this host's files), or None."""
    return error.public if isinstance(error, StreamedConfigError) else None


def _describe(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "the source did not send COMMIT in time"
    if isinstance(error, trio.Cancelled):
        return "cancelled before the hand-over"
    if isinstance(error, PeerError):
        return str(error)  # the source's own line
    if isinstance(error, VmStartError):
        return f"{error.step}: {error.error or error}"
    return str(error) or type(error).__name__
