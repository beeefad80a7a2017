"""benchmarks.qmp's client against a scripted monitor that behaves as QEMU's does when a
client connects during start-up: the session is opened a second time, with a second
greeting and back in capabilities negotiation, before or after the client's
``qmp_capabilities`` was read. QEMU 7.2 did this to a CI run (a test read the second
greeting as the answer to ``qmp_capabilities``)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.common import BenchError
from benchmarks.qmp import NOT_NEGOTIATED, Qmp, connect

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                    "capabilities": ["oob"]}}


class ScriptedMonitor:
    """QEMU's monitor rules (only ``qmp_capabilities`` before negotiation, and not after
    it), with the session opened again after the commands numbered in ``reopen_after``
    (0: right after the first greeting, before any command is read)."""

    def __init__(self, reopen_after: set[int]) -> None:
        self._reopen_after = reopen_after
        self.commands: list[str] = []
        self.negotiated = False

    def _send(self, message: dict[str, object]) -> None:
        self._sock.sendall(json.dumps(message).encode() + b"\r\n")

    def _open(self) -> None:
        self.negotiated = False
        self._send(GREETING)

    def serve(self, sock: socket.socket) -> None:
        # A client that has given up closes its end while the monitor may still be
        # writing (the greeting of the session it opened again): QEMU drops such a
        # session, and so does this one, instead of failing the test from its thread.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        self._sock = sock
        self._open()
        if 0 in self._reopen_after:
            self._open()
        with self._sock.makefile("r") as lines:
            for line in lines:
                name = json.loads(line)["execute"]
                self.commands.append(name)
                if name == "qmp_capabilities" and self.negotiated:
                    self._send({"error": {"class": NOT_NEGOTIATED,
                                          "desc": "Capabilities negotiation is already complete"}})
                elif name == "qmp_capabilities":
                    self.negotiated = True
                    self._send({"return": {}})
                elif not self.negotiated:
                    self._send({"error": {"class": NOT_NEGOTIATED, "desc":
                                          "Expecting capabilities negotiation with "
                                          "'qmp_capabilities'"}})
                else:
                    self._send({"event": "STOP", "data": {}})
                    self._send({"return": {"running": False, "status": name}})
                if len(self.commands) in self._reopen_after:
                    self._open()


@contextmanager
def scripted(tmp_path: Path, reopen_after: set[int]) -> Iterator[tuple[Path, ScriptedMonitor]]:
    """A unix socket at which ``ScriptedMonitor`` answers the first client."""
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    monitor = ScriptedMonitor(reopen_after)

    def accept() -> None:
        sock, _ = listener.accept()
        with sock:
            monitor.serve(sock)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield path, monitor
    finally:
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("reopen_after", "sent"),
    [
        # Greeted twice before the client said anything: its qmp_capabilities
        # negotiates the second session, nothing is sent again.
        ({0}, ["qmp_capabilities", "query-status", "stop"]),
        # Opened again after qmp_capabilities: query-status is refused, negotiated
        # again, and sent once more.
        ({1}, ["qmp_capabilities", "query-status", "qmp_capabilities", "query-status",
               "stop"]),
        # Opened again after a command that succeeded: the next one is sent after a new
        # negotiation (the greeting is read with query-status's refusal).
        ({2}, ["qmp_capabilities", "query-status", "stop", "qmp_capabilities", "stop"]),
    ],
)
def test_a_second_greeting_is_negotiated_again(
    tmp_path: Path, reopen_after: set[int], sent: list[str]
) -> None:
    with scripted(tmp_path, reopen_after) as (path, monitor), Qmp(path, timeout_s=10) as client:
        assert client.command("query-status") == {"running": False,
                                                  "status": "query-status"}
        assert client.command("stop") == {"running": False, "status": "stop"}
        assert [event["event"] for event in client.events] == ["STOP", "STOP"]
    assert monitor.commands == sent


def test_a_monitor_that_keeps_refusing_is_an_error(tmp_path: Path) -> None:
    """A session opened again after every command: one retry, then a clear error."""
    with scripted(tmp_path, set(range(1, 10))) as (path, monitor), \
            Qmp(path, timeout_s=10) as client, \
            pytest.raises(BenchError, match="query-status: refused twice"):
        client.command("query-status")
    assert monitor.commands == ["qmp_capabilities", "query-status", "qmp_capabilities",
                                "query-status"]


def test_an_error_of_a_negotiated_session_is_not_retried(tmp_path: Path) -> None:
    """qmp_capabilities twice in one session is QEMU's error, passed on once."""
    with scripted(tmp_path, set()) as (path, monitor), Qmp(path, timeout_s=10) as client, \
            pytest.raises(BenchError, match="already complete"):
        client.command("qmp_capabilities")
    assert monitor.commands == ["qmp_capabilities", "qmp_capabilities"]


def test_connect_gives_up_when_the_process_exits(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(BenchError, match="exited 0 before its monitor"):
        connect(tmp_path / "never.sock", process, timeout_s=10)
