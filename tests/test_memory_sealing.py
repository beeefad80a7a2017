"""Guest RAM's memfd is sealed against shrinking (issue 11, B8): a vhost-user back-end
that maps it can require F_SEAL_SHRINK, and nobody holding the fd can make the
back-end's accesses fault (SIGBUS) by truncating it."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from avmm.memory import MIB, GuestMemory


def test_guest_ram_memfd_cannot_shrink() -> None:
    with GuestMemory(2 * MIB) as memory:
        seals = fcntl.fcntl(memory.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK
        # A copy of the fd, as a back-end receives it, cannot shrink the file either.
        copy = os.dup(memory.fd)
        try:
            with pytest.raises(OSError) as caught:
                os.ftruncate(copy, MIB)
            assert caught.value.errno == errno.EPERM
        finally:
            os.close(copy)
        assert os.fstat(memory.fd).st_size == 2 * MIB
        memory.write(2 * MIB - 8, b"stillok!")
        assert memory.read(2 * MIB - 8, 8) == b"stillok!"
