"""Migration addresses and listeners: ``unix:/abs/path`` and ``tcp:HOST:PORT`` parsed
strictly; a unix listener is mode 0600 from the start, accepts one connection and
removes its file; TCP port 0 reports the port the kernel chose."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from avmm.migration import MigrationError
from avmm.migration.source import Options
from avmm.migration.transport import connect, listen, parse_address
from avmm.paths import PathPolicy


@pytest.mark.parametrize("text", ["", "unix:", "unix:relative/path", "tcp:", "tcp:host",
                                  "tcp::80", "tcp:host:port", "tcp:host:0", "tcp:h:70000",
                                  "http://x", "unix:/a\0b", "x" * 400])
def test_malformed_addresses_are_one_line_errors(text: str) -> None:
    with pytest.raises(MigrationError) as caught:
        parse_address(text)
    assert "\n" not in str(caught.value)


def test_addresses() -> None:
    assert str(parse_address("unix:/run/in.sock")) == "unix:/run/in.sock"
    assert parse_address("tcp:10.0.0.2:4444").port == 4444
    assert parse_address("tcp:[::1]:4444").host == "::1"
    assert parse_address("tcp:127.0.0.1:0", listen=True).port == 0


@pytest.mark.parametrize("options", [
    Options(downtime_ms=0), Options(on_timeout="retry"), Options(max_rounds=0),
    Options(timeout_s=-1), Options(timeout_s=float("inf"))])
def test_bad_options_are_refused(options: Options) -> None:
    with pytest.raises(MigrationError):
        options.check()


async def test_a_unix_listener_is_private_and_accepts_one_connection(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    listener = await trio.to_thread.run_sync(listen, parse_address(f"unix:{path}"),
                                             PathPolicy())
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with trio.open_nursery() as nursery:
            accepted: list[trio.SocketStream] = []

            async def accept() -> None:
                accepted.append(await listener.accept_one())

            nursery.start_soon(accept)
            client = await connect(parse_address(f"unix:{path}"))
        assert not path.exists(), "the listener went on listening"
        with pytest.raises(MigrationError):
            await connect(parse_address(f"unix:{path}"))
        await client.aclose()
        await accepted[0].aclose()
    finally:
        listener.close()


async def test_tcp_port_zero_reports_the_chosen_port() -> None:
    listener = await trio.to_thread.run_sync(listen, parse_address("tcp:127.0.0.1:0",
                                                                   listen=True), PathPolicy())
    try:
        assert listener.address.port > 0
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept_one())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            client = await connect(listener.address)
        await client.aclose()
        await accepted[0].aclose()
    finally:
        listener.close()


async def test_tcp_connects_to_a_host_name_and_says_why_it_cannot() -> None:
    listener = await trio.to_thread.run_sync(listen, parse_address("tcp:localhost:0",
                                                                   listen=True), PathPolicy())
    try:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept_one())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            client = await connect(parse_address(f"tcp:localhost:{listener.address.port}"))
        assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await client.aclose()
        await accepted[0].aclose()
    finally:
        listener.close()
    # Nothing listens there any more: the connection is refused, with a one-line reason.
    with pytest.raises(MigrationError, match=r"cannot connect to tcp:localhost:\d+: "):
        await connect(parse_address(f"tcp:localhost:{listener.address.port}"))
