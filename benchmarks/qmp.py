"""A small blocking QMP client for the benchmarks that drive QEMU (stop, migrate, cont):
one command at a time, events kept until asked for, file descriptors passed with
``getfd``. Only for QEMU processes this program started itself."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError


class Qmp:
    """A connection to a QEMU monitor socket (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        self._timeout_s = timeout_s
        self.events: list[dict[str, Any]] = []
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(str(path))
            greeting = self._message()
            if "QMP" not in greeting:
                raise BenchError(f"QMP {path}: no greeting: {greeting!r}")
            self.command("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise BenchError("QMP: QEMU closed its monitor")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Run ``name`` and return its ``return`` value; events that arrive meanwhile are
        kept in ``events``. ``fds`` travel with the command (SCM_RIGHTS), as ``getfd``
        needs."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        if fds:
            socket.send_fds(self._sock, [data], fds)
        else:
            self._sock.sendall(data)
        while True:
            message = self._message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise BenchError(f"QMP {name}: {message['error'].get('desc', message)}")
            elif "return" in message:
                return message["return"]

    def wait_event(self, name: str, *, data: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """The first event ``name`` (whose data includes ``data``) not yet consumed."""
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name and all(
                        event.get("data", {}).get(k) == v for k, v in (data or {}).items()):
                    return self.events.pop(index)
            if time.monotonic() > deadline:
                raise BenchError(f"QMP: no {name} {data or ''} event in time")
            message = self._message()
            if "event" in message:
                self.events.append(message)
