"""VirtQueue.give_back: a device that stops without a reset hands back the chains it
took and did not return, so that the position a ring stop (GET_VRING_BASE) or a snapshot
records loses no buffer of the driver's."""

from __future__ import annotations

import pytest

from .queue_helpers import make_queue


@pytest.mark.parametrize("start_index", [0, 0xFFFE])
def test_chains_held_at_the_end_are_untaken_and_taken_again(start_index: int) -> None:
    queue, driver = make_queue(8, start_index=start_index)
    heads = [driver.add_chain(writable=[16]) for _ in range(4)]
    first = queue.pop(driver.memory)
    assert first is not None
    queue.push(driver.memory, first.head, 16)
    held = [queue.pop(driver.memory), queue.pop(driver.memory)]
    assert queue.held == 2
    assert queue.give_back(driver.memory) == (2, 0)
    assert queue.held == 0
    # The position is right after the returned chain: the held ones are available again.
    assert queue.state.next_available == (start_index + 1) & 0xFFFF
    assert queue.state.next_used == queue.state.next_available
    assert driver.used() == [(heads[0], 16)]
    again = [queue.pop(driver.memory) for _ in range(4)]
    assert [chain.head if chain else None for chain in again] == [*heads[1:], None]
    assert [chain.head for chain in held if chain] == heads[1:3]


def test_a_chain_held_before_a_returned_one_comes_back_empty() -> None:
    queue, driver = make_queue(8)
    a, b, c = (driver.add_chain(writable=[16]) for _ in range(3))
    chains = [queue.pop(driver.memory) for _ in range(3)]
    assert [chain.head for chain in chains if chain] == [a, b, c]
    queue.push(driver.memory, b, 16)  # completed out of order: a and c still held
    assert queue.give_back(driver.memory) == (1, 1)
    # c was last taken: un-taken. a cannot be (b, after it, is used): returned empty.
    assert driver.used() == [(b, 16), (a, 0)]
    assert queue.state.next_available == 2 == queue.state.next_used
    retaken = queue.pop(driver.memory)
    assert retaken is not None and retaken.head == c
    assert queue.pop(driver.memory) is None


def test_nothing_held_nothing_changes() -> None:
    queue, driver = make_queue(8)
    driver.add_chain(writable=[16])
    chain = queue.pop(driver.memory)
    assert chain is not None
    queue.push(driver.memory, chain.head, 3)
    assert queue.give_back(driver.memory) == (0, 0)
    assert queue.state.next_available == 1 == queue.state.next_used


def test_a_reset_forgets_what_was_held() -> None:
    queue, driver = make_queue(8)
    driver.add_chain(writable=[16])
    assert queue.pop(driver.memory) is not None
    queue.reset()
    assert queue.held == 0
