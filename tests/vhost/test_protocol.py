"""The vhost-user wire protocol: round trips, fd passing, and hostile bytes."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmm.vhost.protocol import (
    MAX_PAYLOAD,
    Message,
    Request,
    VhostConnectionClosed,
    VhostProtocolError,
    encode_message,
    receive_message,
    send_message,
)

STATE = {"index": 1, "num": 256}
REGION = {"guest_address": 0x1000, "size": 1 << 20, "user_address": 0x7F0000000000,
          "mmap_offset": 4096}

#: (request, payload, reply, fd count) covering every payload layout and direction.
CASES = [
    (Request.GET_FEATURES, None, False, 0),
    (Request.GET_FEATURES, (1 << 32) | (1 << 30), True, 0),
    (Request.SET_FEATURES, 1 << 32, False, 0),
    (Request.SET_OWNER, None, False, 0),
    (Request.RESET_OWNER, None, False, 0),
    (Request.SET_MEM_TABLE, {"nregions": 2, "padding": 0, "regions": [REGION, REGION]}, False, 2),
    (Request.SET_MEM_TABLE, 0, True, 0),
    (Request.SET_LOG_BASE, {"mmap_size": 4096, "mmap_offset": 0}, False, 1),
    (Request.SET_LOG_FD, None, False, 1),
    (Request.SET_VRING_NUM, STATE, False, 0),
    (Request.SET_VRING_ADDR, {"index": 0, "flags": 0, "descriptor": 1, "used": 2,
                              "available": 3, "log": 4}, False, 0),
    (Request.SET_VRING_BASE, STATE, False, 0),
    (Request.GET_VRING_BASE, STATE, False, 0),
    (Request.GET_VRING_BASE, STATE, True, 0),
    (Request.SET_VRING_KICK, 0, False, 1),
    (Request.SET_VRING_CALL, 1 << 8, False, 0),
    (Request.SET_VRING_ERR, 0, False, 1),
    (Request.GET_PROTOCOL_FEATURES, None, False, 0),
    (Request.GET_PROTOCOL_FEATURES, 0x20B, True, 0),
    (Request.SET_PROTOCOL_FEATURES, 0x209, False, 0),
    (Request.GET_QUEUE_NUM, 1, True, 0),
    (Request.SET_VRING_ENABLE, {"index": 0, "num": 1}, False, 0),
    (Request.GET_CONFIG, {"offset": 0, "size": 4, "flags": 0, "payload": bytes(4)}, False, 0),
    (Request.GET_CONFIG, {"offset": 0, "size": 4, "flags": 0, "payload": b"abcd"}, True, 0),
    (Request.SET_CONFIG, {"offset": 8, "size": 1, "flags": 0, "payload": b"x"}, False, 0),
    (Request.GET_INFLIGHT_FD, {"mmap_size": 0, "mmap_offset": 0, "num_queues": 1,
                               "queue_size": 128}, False, 0),
    (Request.SET_INFLIGHT_FD, {"mmap_size": 4096, "mmap_offset": 0, "num_queues": 1,
                               "queue_size": 128}, False, 1),
    (Request.GET_MAX_MEM_SLOTS, 8, True, 0),
    (Request.ADD_MEM_REG, {"padding": 0, "region": REGION}, False, 1),
    (Request.REM_MEM_REG, {"padding": 0, "region": REGION}, False, 0),
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize(("request_code", "payload", "reply", "nfds"), CASES,
                         ids=[f"{c[0].name}{'-reply' if c[2] else ''}" for c in CASES])
async def test_round_trip(request_code: Request, payload: object, reply: bool,
                          nfds: int) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(nfds)]
    with a, b:
        await send_message(a, Message(request_code, payload, reply=reply, need_reply=True), fds)
        received = await receive_message(b)
    try:
        assert received.request == request_code
        assert received.reply == reply and received.need_reply
        assert _plain(received.payload) == _plain(payload)
        assert len(received.fds) == nfds
        for sent, got in zip(fds, received.fds, strict=True):
            assert os.fstat(sent).st_ino == os.fstat(got).st_ino
    finally:
        received.close_fds()
        for fd in fds:
            os.close(fd)


async def test_eof_between_messages_is_connection_closed() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with b:
        a.close()
        with pytest.raises(VhostConnectionClosed):
            await receive_message(b)


def header(request: int, flags: int, size: int) -> bytes:
    return b"".join(v.to_bytes(4, "little") for v in (request, flags, size))


@pytest.mark.parametrize(("data", "nfds", "match"), [
    (header(1, 1, MAX_PAYLOAD + 1), 0, "payload of"),
    (header(99, 1, 0), 0, "unknown request"),
    (header(1, 2, 0), 0, "version"),
    (header(8, 1, 7) + bytes(7), 0, "malformed"),
    (header(3, 1, 4) + bytes(4), 0, "takes no payload"),
    (header(8, 1, 8) + bytes(3), 0, "middle of a message"),
    (header(5, 1, 8) + (9).to_bytes(4, "little") + bytes(4), 0, "malformed"),
    (header(3, 1, 0), 1, "may carry 0 fds"),
    (header(5, 1, 8) + bytes(8), 9, "more than 8 fds"),
])
async def test_rejects(data: bytes, nfds: int, match: str) -> None:
    before = open_fds()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(nfds)]
    with a, b:
        if fds:
            socket.send_fds(a._sock, [data], fds)  # type: ignore[attr-defined]
        else:
            await a.send(data)
        a.shutdown(socket.SHUT_WR)
        for fd in fds:
            os.close(fd)
        with pytest.raises(VhostProtocolError, match=match):
            await receive_message(b)
    assert open_fds() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda r, f, s, body: header(r, f, s) + body,
                  st.integers(0, 45), st.integers(0, 15),
                  st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
                  st.binary(max_size=300)),
        st.sampled_from(CASES).map(lambda case: encode_message(
            Message(case[0], case[1], reply=case[2]))).flatmap(
            lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n])),
    ),
    nfds=st.integers(0, 10),
)
def test_hostile_bytes_raise_only_protocol_errors_and_leak_no_fds(data: bytes,
                                                                  nfds: int) -> None:
    before = open_fds()

    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            fds = [os.eventfd(0) for _ in range(nfds)]
            try:
                if data:
                    if fds:
                        socket.send_fds(a._sock, [data], fds)  # type: ignore[attr-defined]
                    else:
                        await a.send(data)
            finally:
                for fd in fds:
                    os.close(fd)
            a.shutdown(socket.SHUT_WR)
            while True:
                try:
                    message = await receive_message(b)
                except VhostProtocolError:
                    return
                message.close_fds()

    trio.run(main)
    assert open_fds() == before
