"""The one QMP client of the benchmarks and the tests that drive QEMU (stop, migrate,
cont, query-status): blocking, one command at a time, events kept until asked for,
file descriptors passed with ``getfd``. Only for QEMU processes this program started.

QEMU can greet a client twice. A client that connects while QEMU is still starting can
see its monitor opened once by the main loop and once more when the monitor's I/O
thread takes the socket over (a start-up race QEMU's own list discusses; it shows under
load); each opening sends a greeting and puts the session back into capabilities
negotiation. A greeting that arrives mid-session is therefore taken as what it is: the
client negotiates again and repeats the command QEMU refused for want of it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError

#: The class of the error QEMU answers to any command but ``qmp_capabilities`` while a
#: session is in capabilities negotiation.
NOT_NEGOTIATED = "CommandNotFound"


class Qmp:
    """A connection to a QEMU monitor socket (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        self._timeout_s = timeout_s
        self.events: list[dict[str, Any]] = []
        #: Whether the session has left capabilities negotiation; a greeting puts it
        #: back (see the module's docstring).
        self._negotiated = False
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
        if "QMP" in message:
            self._negotiated = False
        return message

    def command(self, name: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Run ``name`` and return its ``return`` value; events that arrive meanwhile are
        kept in ``events``. ``fds`` travel with the command (SCM_RIGHTS), as ``getfd``
        needs. After a greeting (QEMU opened the session again) the session is
        negotiated again first, and a command QEMU refused for want of that is sent
        once more."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        refused = 0
        while True:
            if not self._negotiated and name != "qmp_capabilities":
                self.command("qmp_capabilities")
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
            while True:
                message = self._message()
                if "event" in message:
                    self.events.append(message)
                elif "return" in message:
                    if name == "qmp_capabilities":
                        self._negotiated = True
                    return message["return"]
                elif "error" in message:
                    error = message["error"]
                    if self._negotiated or error.get("class") != NOT_NEGOTIATED:
                        raise BenchError(f"QMP {name}: {error.get('desc', message)}")
                    refused += 1
                    if refused == 2:
                        raise BenchError(f"QMP {name}: refused twice for want of "
                                         "negotiation (QEMU greeted again each time)")
                    break  # greeted again before QEMU read the command: once more

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


def connect(path: Path, process: subprocess.Popen[bytes], *,
            timeout_s: float = 30.0, poll_s: float = 0.01) -> Qmp:
    """The monitor of ``process`` once it listens at ``path``: the socket's name appears
    at bind(), a moment before listen(), so a refused connection is tried again until
    ``timeout_s``; QEMU exiting first is an error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Qmp(path, timeout_s=timeout_s)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if process.poll() is not None:
            raise BenchError(f"QEMU exited {process.returncode} before its monitor {path}")
        if time.monotonic() > deadline:
            raise BenchError(f"QEMU never opened its monitor {path}")
        time.sleep(poll_s)
