"""A vhost-user device's slot across a pause: the rings stop with GET_VRING_BASE, whose
answer becomes the queue's position (what a snapshot saves), and the resume starts the
back-end there with SET_VRING_BASE, not at the used idx found in guest memory (which
is where a reconnect to a back-end that lost its state starts)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from avmm.errors import VmStateError
from avmm.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, Request
from avmm.virtio.device import VIRTIO_F_VERSION_1, DeviceId
from avmm.vm_virtio import DevicePauseError
from tests.vhost.scripted_backend import ScriptedBackend, wait_until
from tests.vhost.test_frontend_hardening import in_thread, rings_running, running_slot
from tests.virtio.slot_harness import RING_BASE

#: What the back-end says its position is when its ring stops; the used idx in guest
#: memory says something else, as it does while the back-end holds requests.
BACKEND_BASE = 7
USED_IDX = 3
_STATE = struct.Struct("<II")
_HEADER = struct.Struct("<III")


class PositionedBackend(ScriptedBackend):
    """Answers GET_VRING_BASE with :data:`BACKEND_BASE`."""

    def _handle(self, conn: socket.socket, request: Request, flags: int, payload: bytes,
                fds: list[int]) -> None:
        if request != Request.GET_VRING_BASE:
            super()._handle(conn, request, flags, payload, fds)
            return
        with self._lock:
            self.requests.append((request, payload))
        index, _ = _STATE.unpack(payload)
        answer = _STATE.pack(index, BACKEND_BASE)
        conn.sendall(_HEADER.pack(int(request), 0x1 | 0x4, len(answer)) + answer)

    def bases_set(self, index: int) -> list[int]:
        with self._lock:
            return [_STATE.unpack(payload)[1] for request, payload in self.requests
                    if request == Request.SET_VRING_BASE
                    and _STATE.unpack(payload)[0] == index]


async def test_a_paused_vhost_user_slot_resumes_at_the_back_ends_position(
        tmp_path: Path) -> None:
    sock = tmp_path / "be.sock"
    with PositionedBackend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
                           ) as backend:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (slot, driver):
            await in_thread(driver.bring_up, (0,))
            await in_thread(wait_until, rings_running(backend, 0), 20.0, "bring-up")
            assert backend.bases_set(0) == [0]
            memory = slot.transport.memory
            memory.write_u16(RING_BASE + 0x2000 + 2, USED_IDX)  # the back-end's used idx

            await slot.pause()
            # The rings stopped before pause returned; the answer is the position.
            assert backend.seen(Request.GET_VRING_BASE, 0) == 1
            assert slot.transport.queues[0].state.next_available == BACKEND_BASE
            saved = slot.transport_state().queues[0]
            assert (saved.next_available, saved.next_used) == (BACKEND_BASE, USED_IDX)
            await trio.sleep(0.2)
            assert backend.bases_set(0) == [0]  # nothing restarts while paused

            await slot.resume()
            await in_thread(wait_until, lambda: len(backend.bases_set(0)) == 2, 20.0,
                            "the restart's SET_VRING_BASE")
            assert backend.bases_set(0) == [0, BACKEND_BASE]
            await in_thread(wait_until, lambda: backend.seen(Request.SET_VRING_ENABLE, 0) == 2,
                            20.0, "the ring enabled again")


async def test_a_back_end_that_never_stops_its_rings_fails_the_pause_with_one_line(
        tmp_path: Path) -> None:
    """No answer to GET_VRING_BASE: the back-end may still write guest memory, so the
    pause cannot promise quiescence and says so (the VM then runs on)."""
    sock = tmp_path / "be.sock"
    with ScriptedBackend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
                         answer_vring_base=False) as backend:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (slot, driver):
            await in_thread(driver.bring_up, (0,))
            await in_thread(wait_until, rings_running(backend, 0), 20.0, "bring-up")
            with trio.fail_after(60), pytest.raises(DevicePauseError) as error:
                await slot.pause()
            assert "\n" not in str(error.value) and "vhost0" in str(error.value)
            assert isinstance(error.value, VmStateError)
            backend.release()
