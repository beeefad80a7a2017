"""The console escape: Ctrl-A x leaves, Ctrl-A Ctrl-A sends one Ctrl-A."""

from __future__ import annotations

from avmm.console_keys import EscapeFilter


def test_plain_bytes_pass_through() -> None:
    assert EscapeFilter().feed(b"ls -l\r") == (b"ls -l\r", False)


def test_ctrl_a_x_leaves_and_drops_the_rest() -> None:
    assert EscapeFilter().feed(b"ab\x01xcd") == (b"ab", True)


def test_ctrl_a_twice_sends_one_and_other_keys_send_both() -> None:
    assert EscapeFilter().feed(b"\x01\x01\x01c") == (b"\x01\x01c", False)


def test_a_sequence_split_across_reads_still_counts() -> None:
    keys = EscapeFilter()
    assert keys.feed(b"a\x01") == (b"a", False)
    assert keys.feed(b"x") == (b"", True)
