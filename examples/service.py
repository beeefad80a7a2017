"""A small trio service that boots VMs on demand, built on ``avmm.host.Host``.

    .venv/bin/python examples/service.py --socket /tmp/avmm-service.sock

It listens on a unix socket and speaks one line per request:

    run <scenario> [word ...]   boot the test guest with ``avmm.test=<scenario>`` and the
                                words on its command line; stream its serial output back,
                                then one line ``exit <reason> <status>``
    ps                          one line per VM it is running: ``<id> <state> <scenario>``
    quit                        close this connection

Try it with ``socat - UNIX-CONNECT:/tmp/avmm-service.sock`` and type ``run hello``.
Every connection is served concurrently and every VM runs in the same process, each in
its own task of the Host. SIGINT or SIGTERM stops every VM and removes the socket.
(``make guest`` builds the test guest first.)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
from pathlib import Path

import trio

import avmm
from avmm.host import Host

HERE = Path(__file__).resolve().parent
TEST_GUEST = HERE.parent / "build" / "guest" / "testguest.elf"
WORD = re.compile(r"[A-Za-z0-9_.=-]{1,100}")


class Service:
    def __init__(self, host: Host, *, timeout_s: float) -> None:
        self.host = host
        self.timeout_s = timeout_s
        self.scenarios: dict[str, str] = {}  # VM id -> scenario, for `ps`

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            reader = LineReader(stream)
            while (line := await reader.readline()) is not None:
                words = line.split()
                try:
                    if words[:1] == ["run"] and len(words) >= 2:
                        await self.run(stream, words[1], words[2:])
                    elif words == ["ps"]:
                        await self.ps(stream)
                    elif words == ["quit"]:
                        return
                    else:
                        await stream.send_all(b"error: say run <scenario> [word ...], "
                                              b"ps or quit\n")
                except avmm.AvmmError as e:
                    await stream.send_all(f"error: {e}\n".encode())
                except trio.BrokenResourceError:
                    return  # the client went away; its VM was stopped on the way out

    async def run(self, stream: trio.SocketStream, scenario: str, extra: list[str]) -> None:
        if not all(WORD.fullmatch(word) for word in [scenario, *extra]):
            await stream.send_all(b"error: words may only hold letters, digits and _.=-\n")
            return
        config = avmm.config_from_dict({
            "machine": {"memory_mib": 32, "acpi": False},
            "boot": {"kernel": str(TEST_GUEST),
                     "cmdline": " ".join([f"avmm.test={scenario}", *extra])},
            "serial": {"mode": "none"},
        }, base_dir=None, source="service request")
        hosted = await self.host.create(config)
        self.scenarios[hosted.id] = scenario
        try:
            with trio.move_on_after(self.timeout_s):
                async with hosted.subscribe_console() as console:
                    async for chunk in console:  # ends once the VM has stopped
                        await stream.send_all(chunk)
            result = await hosted.stop(f"the service's {self.timeout_s} s limit passed")
            await stream.send_all(f"exit {result.reason} {result.exit_status}\n".encode())
        finally:
            with trio.CancelScope(shield=True):
                await self.host.remove(hosted.id)
            del self.scenarios[hosted.id]

    async def ps(self, stream: trio.SocketStream) -> None:
        listing = "".join(f"{hosted.id} {hosted.state} {self.scenarios.get(hosted.id, '?')}\n"
                          for hosted in self.host.list())
        await stream.send_all(listing.encode() or b"no VMs\n")


class LineReader:
    """A stream's input one decoded line at a time (without the line end)."""

    def __init__(self, stream: trio.SocketStream, limit: int = 4096) -> None:
        self.stream = stream
        self.limit = limit
        self.buffer = b""

    async def readline(self) -> str | None:
        """The next line; None at the end of input (or for a line over the limit)."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data or len(self.buffer) > self.limit:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip()


async def listen(path: str) -> trio.SocketListener:
    if os.path.exists(path):
        os.unlink(path)  # left over from an earlier run
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(16)
    return trio.SocketListener(sock)


async def main(socket_path: str, timeout_s: float) -> None:
    avmm.configure_logging(level="warning")
    listener = await listen(socket_path)
    try:
        async with Host() as host, trio.open_nursery() as nursery:
            service = Service(host, timeout_s=timeout_s)
            nursery.start_soon(trio.serve_listeners, service.handle, [listener])
            print(f"listening on {socket_path}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(f"{signal.Signals(signum).name}: stopping every VM", flush=True)
                    nursery.cancel_scope.cancel()
                    break
        # Leaving the Host stopped (and joined) every VM.
    finally:
        os.unlink(socket_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default="/tmp/avmm-service.sock")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a VM may run before it is stopped (default 60)")
    args = parser.parse_args()
    trio.run(main, args.socket, args.timeout)
