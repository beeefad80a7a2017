"""Fixtures for the KVM binding tests: a bare long-mode guest running given code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from .guest import Guest, boot_guest


@pytest.fixture
def make_guest() -> Iterator[Callable[..., Guest]]:
    """``make_guest(code, *, memory_mib=2, extra=None)`` → ``(vm, vcpu,
    memory)``: a VM in the 64-bit boot state with ``code`` at 1 MiB (see
    :func:`tests.kvm.guest.boot_guest`). Everything it made is closed after the test."""
    with ExitStack() as cleanup:

        def make(code: bytes, **options: object) -> Guest:
            return boot_guest(cleanup, code, **options)  # type: ignore[arg-type]

        yield make
