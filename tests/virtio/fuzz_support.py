"""Hostile-driver fuzzing for virtio devices, shared by ``tests/virtio/test_fuzz_*.py``.

One *episode* plays a driver that lays out a few descriptor chains on each of the
device's queues, most of them broken on purpose at the ring or descriptor level (a loop,
a buffer outside RAM, a length that runs past the end, the wrong direction, an indirect
table where none was negotiated, zero-length buffers, a chain longer than the queue, ...),
runs the device until it has nothing left to do or stops with DeviceNeedsReset, and
checks, after every episode:

* guest memory is byte-for-byte what it was, except the device-writable buffers of the
  chains the device took (up to the first chain that stops it) and the used-ring fields a
  device may write: flags (without EVENT_IDX), idx, the entries it added and avail_event
  (with EVENT_IDX);
* the queue took exactly what a plain reading of virtio 1.2 §2.7 (:func:`reference_chain`)
  accepts, with the same buffers, and refused the rest; nothing past a refused chain
  was taken;
* every used entry names a chain the device took and not yet returned, with a length no
  larger than that chain's writable bytes;
* the device raised DeviceNeedsReset exactly when it reached a chain that breaks the
  queue's or the device's rules (the device's own test supplies its rules), and a queue
  the device drains by itself was drained up to that chain;
* then the device is reset, as a transport would, and must serve a well-formed request
  correctly (the device's test checks the result: a sector read back, an echoed frame...).

Every chain the device reached is counted by what it was built as; the hostile ones are
what a test asserts on (:data:`HOSTILE_TARGET` per device) and prints.

Chains come from a seeded ``random.Random``: a Hypothesis draw costs ~0.2 ms here, too
much for tens of thousands of chains. One ``AVMM_FUZZ_SEED`` (default 11; another value
runs another set of episodes) builds the same chains every run, and a failure carries a
note naming the seed and the episode. (What the device does with them may still vary a
little: trio shuffles the order of tasks that are ready together, such as a console's
receive task and the task typing input.)
"""

from __future__ import annotations

import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
import trio
import trio.testing

from avmm.memory import ByteArrayMemory, MemoryAccess
from avmm.virtio.device import DeviceNeedsReset, VirtioDevice
from avmm.virtio.queue import DescriptorChain, QueueError, VirtQueue

from .fuzz_chains import (
    AVAIL_JUMP,
    DESCRIPTOR,
    DUPLICATE_HEAD,
    FINAL_RING_KINDS,
    HARMLESS_RING_KINDS,
    INDIRECT_KINDS,
    INDIRECT_NOT_NEGOTIATED,
    NEXT,
    OVER_4GIB,
    RAM_SIZE,
    REFUSED_KINDS,
    REWRITTEN_IN_FLIGHT,
    WELL_FORMED,
    WRITE,
    ChainWriter,
    NoRoom,
    Planned,
    Range,
    Request,
    reference_chain,
)
from .queue_helpers import DriverQueue

#: Hostile chains each device must have reached in its fuzz run.
HOSTILE_TARGET = 10_000
#: The run's seed (episode i uses a generator seeded from it and i).
SEED = int(os.environ.get("AVMM_FUZZ_SEED", "11"))
_RING_BASE = 0x1000
_RING_STRIDE = 0x1000
_DATA_START = 0x10000

# -- the device side: a queue that records what it did --------------------------------------


class RecordingQueue(VirtQueue):
    """A VirtQueue that records each chain taken (with its slot), each slot refused, and
    each used entry pushed."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.forget()

    def forget(self) -> None:
        self.taken: list[tuple[int, DescriptorChain]] = []
        self.refused: list[int] = []
        self.pushes: list[tuple[int, int]] = []

    def pop(self, memory: MemoryAccess) -> DescriptorChain | None:
        slot = self.state.next_available
        try:
            chain = super().pop(memory)
        except QueueError:
            self.refused.append(slot)
            raise
        if chain is not None:
            self.taken.append((slot, chain))
        return chain

    def push(self, memory: MemoryAccess, head: int, written: int) -> None:
        self.pushes.append((head, written))
        super().push(memory, head, written)

    def took(self, memory: MemoryAccess, chains: int, readable_bytes: int,
             written_bytes: int) -> None:
        """A C loop (avmm.virtio.net_fast) took and returned chains itself: record them
        as pops and pushes, read back from the rings (the chains as the ring holds them
        now: the fuzz guest rewrites only chains a device holds, and a C loop holds
        none after its call)."""
        s = self.state
        position, used = s.next_available, s.next_used
        try:
            for k in range(chains):
                s.next_available = (position - chains + k) & 0xFFFF
                chain = VirtQueue.pop(self, memory)
                assert chain is not None, "a C loop took a chain the ring does not hold"
                self._taken_at[chain.head] = -1
                self.taken.append((s.next_available - 1 & 0xFFFF, chain))
                element = 4 + 8 * ((used - chains + k) & (s.size - 1))
                head, written = struct.unpack_from(
                    "<II", memory.view(s.used_ring + element, 8))
                self.pushes.append((head, written))
        finally:
            s.next_available = position


class FuzzContext:
    """A DeviceContext over the fuzz guest: every queue starts kicked (the driver made
    chains available before the device ran); ``kick`` adds one."""

    def __init__(self, memory: ByteArrayMemory, queues: Sequence[VirtQueue],
                 features: int) -> None:
        self.memory = memory
        self.queues = list(queues)
        self.features = features
        self.signals: list[int] = []
        self._kicked = [True] * len(self.queues)
        self._events = [trio.Event() for _ in self.queues]

    def kick(self, queue_index: int) -> None:
        self._kicked[queue_index] = True
        self._events[queue_index].set()

    async def wait_kick(self, queue_index: int) -> None:
        if self._kicked[queue_index]:
            await trio.lowlevel.checkpoint()
        else:
            self._events[queue_index] = trio.Event()
            await self._events[queue_index].wait()
        self._kicked[queue_index] = False

    def signal_used(self, queue_index: int) -> None:
        self.signals.append(queue_index)

    def signal_config_change(self) -> None:
        pass


async def run_until_idle(device: VirtioDevice, context: FuzzContext,
                         tasks: Sequence[Callable[[], Awaitable[object]]] = ()
                         ) -> DeviceNeedsReset | None:
    """Run the device (and ``tasks`` beside it) until every task waits, then cancel:
    returns the DeviceNeedsReset it raised, if any. Any other exception fails the test."""
    error: DeviceNeedsReset | None = None

    async def device_task() -> None:
        nonlocal error
        try:
            await device.run(context)
        except DeviceNeedsReset as e:
            error = e

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_task)
            for task in tasks:
                nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    return error


class FuzzGuest:
    """The guest memory and the device-side queues every round reuses."""

    def __init__(self, queue_max_sizes: Sequence[int]) -> None:
        self.memory = ByteArrayMemory(RAM_SIZE)
        # Junk everywhere: a stray write is seen even where it writes zeroes.
        self.memory.data[:] = random.Random(SEED).randbytes(RAM_SIZE)
        self.queues = [RecordingQueue(size) for size in queue_max_sizes]


class Round:
    """Fresh rings on every queue (as a driver sets them up after a reset), chains
    placed on them, the device run over them, and the checks of what it did."""

    def __init__(self, guest: FuzzGuest, rng: random.Random, *, size: int, features: int,
                 event_idx: bool, indirect: bool, start: int) -> None:
        self.guest = guest
        self.memory = guest.memory
        self.rng = rng
        self.size = size
        self.features = features
        self.event_idx = event_idx
        self.indirect = indirect
        self.start = start
        count = len(guest.queues)
        share = (RAM_SIZE - _DATA_START) // count
        self.writers: list[ChainWriter] = []
        for index, queue in enumerate(guest.queues):
            driver = DriverQueue(self.memory, size, _RING_BASE + _RING_STRIDE * index,
                                 event_idx=event_idx, start_index=start,
                                 data_address=_DATA_START + share * index, data_size=share)
            # What the driver never reads before the device writes it (the used ring's
            # flags and entries, avail_event) or never shows the device (descriptors of
            # no chain) holds junk, so that a stray write shows even where it writes 0.
            data = self.memory.data
            table, used = driver.descriptor_table, driver.used_ring
            data[table:table + 16 * size] = rng.randbytes(16 * size)
            data[used:used + 2] = rng.randbytes(2)
            data[used + 4:used + 6 + 8 * size] = rng.randbytes(2 + 8 * size)
            queue.reset()
            driver.configure(queue, indirect=indirect)
            queue.validate(self.memory)
            queue.forget()
            self.writers.append(ChainWriter(self.memory, rng, index, driver, indirect=indirect))
        self.snapshot = b""
        self.context = FuzzContext(self.memory, guest.queues, features)
        #: Hostile driver actions that are not chains (counted apart).
        self.events: Counter[str] = Counter()

    def place(self, queue: int, request: Request, kind: str = WELL_FORMED) -> Planned:
        """Lay out a chain on ``queue`` (raises NoRoom when the ring or data area is full)."""
        if kind == DUPLICATE_HEAD:
            plan = self.writers[queue].duplicate()
            if plan is not None:
                return plan
            kind = WELL_FORMED
        return self.writers[queue].add(request, kind)

    def publish(self, stops: Callable[[int, Planned], bool]) -> None:
        """Move every available idx past the chains placed, read each chain as the
        reference does (``stops(queue, plan)`` adds the device's rules), and take the
        snapshot the checks compare with."""
        data = self.memory.data
        for writer in self.writers:
            writer.driver.set_avail_idx(writer.next_slot)
            for plan in writer.plans:
                reading = reference_chain(data, self.size, writer.driver.descriptor_table,
                                          plan.head if plan.head >= 0 else self.size,
                                          self.indirect)
                plan.refused = reading is None
                if plan.refused != (plan.kind in REFUSED_KINDS):
                    raise AssertionError(
                        f"the fuzzer built a {plan.kind!r} chain that the reference "
                        f"{'refuses' if plan.refused else 'accepts'}: a fuzzer bug")
                if reading is not None:
                    plan.readable, plan.writable = map(tuple, reading)
                plan.stops = plan.refused or stops(writer.index, plan)
        self.snapshot = bytes(data)

    def jump(self, queue: int) -> Planned:
        """After the device drained the ring: move the available idx more than a queue's
        worth ahead of the device (or behind it), and kick."""
        writer = self.writers[queue]
        plan = writer._plan(-1, AVAIL_JUMP)
        plan.refused = plan.stops = True
        writer.plans.append(plan)
        value = (writer.next_slot + self.rng.randint(self.size + 1, 0xFFFF)) & 0xFFFF
        self.driver_write(writer.driver.available_ring + 2, struct.pack("<H", value))
        self.context.kick(queue)
        return plan

    def rewrite_in_flight(self, queue: int) -> int:
        """Overwrite every descriptor of the chains the device took from ``queue`` and
        still holds with others pointing elsewhere in RAM: a device that reads them
        again, instead of keeping what it checked, writes where it may not. Returns how
        many chains were rewritten."""
        writer = self.writers[queue]
        recorder = self.guest.queues[queue]
        by_slot = {plan.slot: plan for plan in writer.plans}
        held = Counter(by_slot[slot].head for slot, _ in recorder.taken)
        held.subtract(head for head, _ in recorder.pushes)
        taken_slots = {slot for slot, _ in recorder.taken}
        rng = self.rng
        count = 0
        for plan in writer.plans:
            if (held[plan.head] <= 0 or plan.slot not in taken_slots
                    or any(p.head == plan.head and p.slot not in taken_slots
                           for p in writer.plans)):
                continue  # not held, or its head is still to be taken again
            held[plan.head] = 0
            for address in plan.descriptors:
                length = rng.randint(1, 2048)
                self.driver_write(address, DESCRIPTOR.pack(
                    rng.randrange(RAM_SIZE - length), length, rng.choice((0, WRITE, NEXT)),
                    rng.randrange(self.size)))
            count += 1
        self.events[REWRITTEN_IN_FLIGHT] += count
        return count

    def driver_write(self, address: int, data: bytes) -> None:
        """The driver writes guest memory while the device runs (the checks expect it)."""
        self.memory.data[address:address + len(data)] = data
        self.snapshot = self.snapshot[:address] + data + self.snapshot[address + len(data):]

    # -- what the device did ------------------------------------------------------------------

    def reached(self, queue: int) -> list[Planned]:
        """The chains of ``queue`` the device took or had refused, in ring order."""
        writer = self.writers[queue]
        recorder = self.guest.queues[queue]
        by_slot = {plan.slot: plan for plan in writer.plans}
        slots = {slot for slot, _ in recorder.taken} | set(recorder.refused)
        return sorted((by_slot[slot] for slot in slots if slot in by_slot),
                      key=lambda plan: plan.position)

    def check(self, error: DeviceNeedsReset | None, drained: frozenset[int]) -> None:
        """The device-independent checks (see the module docstring). ``drained``: queues
        the device empties by itself whenever it runs."""
        allowed: list[Range] = []
        stop_reached: list[Planned] = []
        for index, writer in enumerate(self.writers):
            recorder = self.guest.queues[index]
            by_slot = {plan.slot: plan for plan in writer.plans}
            first_stop = next((p.position for p in writer.plans if p.stops), len(writer.plans))
            taken_heads: Counter[int] = Counter()
            writable_of: dict[int, int] = {}
            for slot, chain in recorder.taken:
                plan = by_slot.get(slot)
                assert plan is not None, f"queue {index} took slot {slot}, never made available"
                assert not plan.refused, (
                    f"queue {index} took a {plan.kind!r} chain the reference refuses")
                assert (chain.head, chain.readable, chain.writable) == (
                    plan.head, plan.readable, plan.writable), (
                    f"queue {index} read a {plan.kind!r} chain as {chain}, the reference as "
                    f"{plan.head}, {plan.readable}, {plan.writable}")
                if plan.position > first_stop:
                    assert not writer.plans[first_stop].refused, (
                        f"queue {index} took a chain past a refused one")
                    continue  # taken, never to be touched: the device stopped before it
                if plan.stops:
                    stop_reached.append(plan)
                taken_heads[plan.head] += 1
                writable_of[plan.head] = plan.writable_length
                allowed.extend(plan.writable)
            for slot in recorder.refused:
                plan = by_slot.get(slot)
                assert plan is not None and plan.refused, (
                    f"queue {index} refused slot {slot}, a "
                    f"{'ring slot never made available' if plan is None else repr(plan.kind)}")
                # Past the first stop only where that one was the device's to refuse
                # (virtio-blk pops a whole batch before it looks at the requests).
                assert plan.position == first_stop or (
                    plan.position > first_stop and not writer.plans[first_stop].refused), (
                    f"queue {index} looked at a chain past a refused one")
                stop_reached.append(plan)
            # Used entries: each names a chain in the device's hands, within its length.
            for head, written in recorder.pushes:
                assert taken_heads[head] > 0, (
                    f"queue {index}: used entry {head} names no chain the device held")
                taken_heads[head] -= 1
                assert written <= writable_of[head], (
                    f"queue {index}: used length {written} for chain {head} with "
                    f"{writable_of[head]} writable bytes")
            driver = writer.driver
            used = driver.used_ring
            pushes = recorder.pushes
            assert driver.used_idx == (self.start + len(pushes)) & 0xFFFF
            for k, entry in enumerate(pushes[-self.size:], max(len(pushes) - self.size, 0)):
                assert driver.used_element((self.start + k) % self.size) == entry
            allowed.append((used + 2, 2))
            allowed.extend((used + 4 + 8 * ((self.start + k) % self.size), 8)
                           for k in range(len(pushes)))
            allowed.append((used + 4 + 8 * self.size, 2) if self.event_idx else (used, 2))
        assert (error is not None) == bool(stop_reached), (
            f"device raised {error!r}, chains that must stop it reached: "
            f"{[p.kind for p in stop_reached]}")
        # Queues the device drains by itself: drained up to where it stopped.
        for index in drained:
            writer = self.writers[index]
            mine = [p.position for p in stop_reached if p.queue == index]
            if error is not None and not mine:
                continue  # another queue stopped the device
            reached = {p.position for p in self.reached(index)}
            end = min(mine) + 1 if mine else len(writer.plans)
            missing = [p.kind for p in writer.plans[:end] if p.position not in reached]
            assert not missing, f"queue {index}: chains never reached: {missing}"
        self._check_memory(allowed)

    def _check_memory(self, allowed: list[Range]) -> None:
        current = self.memory.data
        expected = bytearray(self.snapshot)
        for address, length in allowed:
            expected[address:address + length] = current[address:address + length]
        if expected == current:
            return
        first = next(i for i in range(len(current)) if current[i] != expected[i])
        raise AssertionError(
            f"guest memory at 0x{first:x} changed outside every writable buffer and "
            f"used-ring field the device may write: {self._where(first)}")

    def _where(self, address: int) -> str:
        for writer in self.writers:
            d = writer.driver
            for name, start, length in (("descriptor table", d.descriptor_table, 16 * d.size),
                                        ("available ring", d.available_ring, 6 + 2 * d.size),
                                        ("used ring", d.used_ring, 6 + 8 * d.size)):
                if start <= address < start + length:
                    return f"queue {writer.index} {name} + {address - start}"
            for plan in writer.plans:
                for a, n in plan.readable + plan.writable:
                    if a <= address < a + n:
                        return f"queue {writer.index} {plan.kind} chain {plan.head}"
        return "no ring or buffer"


# -- the fuzz loop --------------------------------------------------------------------------


@dataclass
class Tally:
    """What the device reached, counted by what it was built as."""

    name: str
    chains: int = 0
    hostile: int = 0
    well_formed: int = 0
    episodes: int = 0
    resets: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    #: Hostile driver actions that are not chains.
    events: Counter[str] = field(default_factory=Counter)

    def count(self, plans: Sequence[Planned]) -> None:
        for plan in plans:
            self.chains += 1
            if plan.kind == WELL_FORMED:
                self.well_formed += 1
            else:
                self.hostile += 1
                self.kinds[plan.kind] += 1

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in self.kinds.most_common())
        events = "".join(f"; {kind}: {n:,}" for kind, n in self.events.most_common())
        return (f"fuzz {self.name}: {self.chains:,} chains reached, {self.hostile:,} hostile "
                f"(kinds: {kinds}), {self.well_formed:,} well-formed{events}; "
                f"{self.episodes:,} episodes, each then reset and a well-formed request "
                f"checked ({self.resets:,}); seed {SEED}")


class FuzzTarget:
    """What a device's fuzz test supplies. Queue ``i`` takes chains as ``roles[i]`` says;
    ``drained`` lists the queues the device empties by itself."""

    name: str
    roles: tuple[str, ...]
    drained: frozenset[int]
    queue_max_sizes: tuple[int, ...]
    sizes: tuple[int, ...] = (4, 8, 16, 32, 64)

    def features(self, rng: random.Random) -> int:
        return 0

    def well_formed(self, rng: random.Random, queue: int, features: int) -> Request:
        raise NotImplementedError

    def content_hostile(self, rng: random.Random, queue: int, features: int,
                        final: bool) -> Request | None:
        """A request broken in the device's own terms ("too-short header"), or None.
        Unless ``final``, one the device must not stop for."""
        return None

    def stops(self, queue: int, plan: Planned, features: int) -> bool:
        """The device's rules: must it raise DeviceNeedsReset for this accepted chain?"""
        raise NotImplementedError

    def begin(self, round_: Round) -> list[Callable[[], Awaitable[object]]]:
        """Before the device runs: host-side input (frames, console input), returned as
        tasks to run beside it."""
        return []

    def more(self, round_: Round) -> list[Callable[[], Awaitable[object]]] | None:
        """Once the device went idle without stopping: more to do (the driver rewriting
        what the device holds, more input), as tasks for another run; None: nothing."""
        return None

    async def serve(self, round_: Round,
                    tasks: Sequence[Callable[[], Awaitable[object]]]) -> DeviceNeedsReset | None:
        """Run the device over the round until idle; the DeviceNeedsReset it raised."""
        raise NotImplementedError

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        """The device's own checks of an episode (what it sent, wrote, answered)."""

    def reset(self) -> None:
        raise NotImplementedError

    async def check_after_reset(self, guest: FuzzGuest, rng: random.Random) -> None:
        """Serve a well-formed request on fresh rings (with :func:`well_formed_round`) and
        check its result."""
        raise NotImplementedError


def new_round(target: FuzzTarget, guest: FuzzGuest, rng: random.Random,
              sizes: Sequence[int] | None = None) -> Round:
    """Fresh rings of a random size (one of ``sizes``, by default the target's), with
    random features, ring features and start index."""
    size = rng.choice(sizes or target.sizes)
    return Round(guest, rng, size=size, features=target.features(rng),
                 event_idx=rng.random() < 0.5, indirect=rng.random() < 0.6,
                 start=rng.choice((0, rng.getrandbits(16), (0xFFFF - rng.randrange(size)))))


async def well_formed_round(target: FuzzTarget, round_: Round,
                            requests: Sequence[tuple[int, Request]],
                            tasks: Callable[[Round], list[Callable[[], Awaitable[object]]]]
                            | None = None) -> list[Planned]:
    """Place well-formed ``(queue, request)`` chains, run the device, check the round
    (it must not raise, and must not write outside the chains' buffers): the plans."""
    plans = [round_.place(queue, request) for queue, request in requests]
    round_.publish(lambda queue, plan: target.stops(queue, plan, round_.features))
    assert not any(plan.stops for plan in plans), "a well-formed request the device refuses"
    error = await target.serve(round_, tasks(round_) if tasks else [])
    round_.check(error, frozenset())
    return plans


async def _episode(target: FuzzTarget, guest: FuzzGuest, rng: random.Random,
                   tally: Tally) -> None:
    round_ = new_round(target, guest, rng)
    features = round_.features
    queues = range(len(target.roles))
    stop_queue = rng.choice(queues) if rng.random() < 0.85 else None
    for queue in queues:
        writer = round_.writers[queue]
        count = rng.randint(2, min(16, round_.size))
        final = queue == stop_queue
        try:
            for _ in range(count - final):
                if final and (writer.slots_left < 2 or len(writer.free) < 6):
                    break  # keep room for the chain that stops the device
                round_.place(queue, *_choose(target, rng, queue, features, round_.indirect,
                                             False))
            if final:
                round_.place(queue, *_choose(target, rng, queue, features, round_.indirect,
                                             True))
                # Chains after the one that stops the device: never to be touched.
                for _ in range(rng.choice((0, 0, 1, 2))):
                    round_.place(queue, target.well_formed(rng, queue, features))
        except NoRoom:
            pass
    round_.publish(lambda queue, plan: target.stops(queue, plan, features))
    error = await target.serve(round_, target.begin(round_))
    if error is None and (tasks := target.more(round_)) is not None:
        error = await target.serve(round_, tasks)
    if error is None and target.drained and rng.random() < 0.7:
        # A queue the device drained (so its next pop is past every chain placed).
        round_.jump(rng.choice(sorted(target.drained)))
        error = await target.serve(round_, [])
    round_.check(error, target.drained)
    target.check(round_, error)
    for queue in queues:
        tally.count(round_.reached(queue))
    tally.events += round_.events
    tally.episodes += 1

    # What a transport does after DEVICE_NEEDS_RESET (or any driver reset), then a
    # well-formed request that must be served correctly.
    target.reset()
    await target.check_after_reset(guest, rng)
    tally.resets += 1


def _choose(target: FuzzTarget, rng: random.Random, queue: int, features: int,
            indirect: bool, final: bool) -> tuple[Request, str]:
    """A request and the way to break it: the last chain of the queue that stops the
    device breaks a rule that stops it; the others mostly break rules that don't."""
    roll = rng.random()
    if final:
        if roll < 0.2 and (request := target.content_hostile(rng, queue, features, True)):
            return request, WELL_FORMED
        kinds = FINAL_RING_KINDS + (INDIRECT_KINDS if indirect else
                                     (INDIRECT_NOT_NEGOTIATED,) * 2)
        kind = OVER_4GIB if rng.random() < 0.003 else rng.choice(kinds)
        return target.well_formed(rng, queue, features), kind
    if roll < 0.3:
        return target.well_formed(rng, queue, features), WELL_FORMED
    if roll < 0.4 and (request := target.content_hostile(rng, queue, features, False)):
        return request, WELL_FORMED
    return target.well_formed(rng, queue, features), rng.choice(HARMLESS_RING_KINDS)


def quiet_logs() -> None:
    """Drop the devices' debug lines (one per dropped frame): a failing fuzz run would
    show tens of thousands of them. Call before making the device, whose logger binds
    the configuration then; the test's logging is reset after it."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


def fuzz(target: FuzzTarget, episodes: int) -> Tally:
    """Run ``episodes`` episodes against ``target`` in one trio run; the tally."""
    tally = Tally(target.name)
    guest = FuzzGuest(target.queue_max_sizes)

    async def main() -> None:
        for episode in range(episodes):
            seed = SEED * 1_000_003 + episode
            try:
                await _episode(target, guest, random.Random(seed), tally)
            except BaseException as e:
                e.add_note(f"fuzz {target.name}: episode {episode}, seed {seed} "
                           f"(AVMM_FUZZ_SEED={SEED})")
                raise

    trio.run(main)
    return tally
