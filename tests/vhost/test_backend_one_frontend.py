"""``avmm backend`` serves one front-end at a time (README, "Devices as vhost-user
back-ends"): a second front-end that connects meanwhile is not served until the first
has gone, and is served then."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.config import VhostUserConfig
from avmm.vhost.protocol import Request
from tests.vhost.test_frontend import avmm_backend
from tests.vm.helpers import MAILBOX_ADDRESS, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

_HEADER = struct.Struct("<III")
_VERSION_1 = 0x1
_REPLY_FLAG = 0x4
VIRTIO_F_VERSION_1 = 1 << 32
#: How long the second front-end listens for an answer that must not come. Not a speed
#: figure: the back-end answers GET_FEATURES in microseconds when it serves a client.
_SILENCE_S = 2.0


async def _receive_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"the back-end closed the connection after {len(data)} bytes")
        data += chunk
    return data


async def test_a_second_frontend_is_served_only_after_the_first_has_gone(
        tmp_path: Path) -> None:
    sock_path = tmp_path / "rng.sock"
    with avmm_backend("rng", sock_path):
        config = dataclasses.replace(
            guest_config("avmm.test=count avmm.n=100000000000000"),
            vhost_users=(VhostUserConfig(socket=sock_path, device_id=4, num_queues=1),))
        second = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with second:
            # The first front-end: a VM whose start connected and negotiated with the
            # back-end; it keeps the connection until the VM is released.
            async with VirtualMachine(config) as first:
                assert first.memory is not None
                with trio.fail_after(60):
                    while first.memory.read_u64(MAILBOX_ADDRESS + 8) == 0:
                        await trio.sleep(0.01)
                # The second connection itself succeeds (the listen backlog holds it) ...
                with trio.fail_after(30):
                    await second.connect(str(sock_path))
                await second.send(_HEADER.pack(Request.GET_FEATURES, _VERSION_1, 0))
                # ... but nobody reads it while the first front-end is served.
                with trio.move_on_after(_SILENCE_S) as silence:
                    early = await second.recv(1)
                assert silence.cancelled_caught, f"the back-end answered: {early!r}"
                first.stop("the first front-end leaves")
            result = first.exit
            # The first VM is released (its connection closed): now the second front-end's
            # request is read and answered.
            with trio.fail_after(60):
                header = await _receive_exactly(second, _HEADER.size)
                request, flags, size = _HEADER.unpack(header)
                assert (request, flags & _REPLY_FLAG, size) == (
                    Request.GET_FEATURES, _REPLY_FLAG, 8)
                (features,) = struct.unpack("<Q", await _receive_exactly(second, 8))
    assert result is not None
    assert result.reason is StopReason.STOPPED
    assert features & VIRTIO_F_VERSION_1
