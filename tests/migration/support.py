"""Helpers for migration tests: the mem-walk guest on a source VM, its serial output
collected on both sides, a destination receiving it.

The guest walks many rounds (``MEM_WALK_ROUNDS``) so that it is still walking when a
migration ends, however slow the host: it verifies every word of its buffer after each
round, and prints ``verify=ok`` at the end only if all of them held.
"""

from __future__ import annotations

import trio

from avmm import StopReason, VirtualMachine, VmExit, VmState
from avmm.migration import HandOverUnconfirmed
from tests.snapshot.support import TIMEOUT_S
from tests.state.mem_walk import PREFIX, expected_lines, mem_walk_lines
from tests.vm.helpers import guest_config

__all__ = [
    "MEM_WALK",
    "TIMEOUT_S",
    "check_refused_after_commit",
    "check_walk",
    "collect",
    "guest_config",
    "mem_walk_lines",
    "read_until",
]

MEM_WALK_MIB = 16
MEM_WALK_ROUNDS = 400
MEM_WALK = f"avmm.test=mem-walk avmm.mib={MEM_WALK_MIB} avmm.rounds={MEM_WALK_ROUNDS}"
#: The rounds whose CRC the host computes itself (cheap enough); the guest's own
#: per-round verification covers the others.
CHECKED_ROUNDS = 8


async def collect(vm: VirtualMachine, output: bytearray) -> None:
    """Append everything the guest prints to ``output`` until its serial port closes
    (the VM stopped)."""
    async for chunk in vm.serial:
        output += chunk


async def read_until(output: bytearray, text: str, timeout: float = TIMEOUT_S) -> None:
    """Wait until a collecting task has put ``text`` into ``output``."""
    with trio.fail_after(timeout):
        while text.encode() not in output:
            await trio.sleep(0.01)


def rounds_printed(output: str) -> list[int]:
    return [int(line.split("round=")[1].split()[0]) for line in mem_walk_lines(output)
            if " round=" in line]


_EXPECTED_START = expected_lines(MEM_WALK_MIB, CHECKED_ROUNDS)[:CHECKED_ROUNDS]


def mem_walk(rounds: int = MEM_WALK_ROUNDS) -> str:
    """The command line of a mem-walk of ``rounds`` rounds."""
    return f"avmm.test=mem-walk avmm.mib={MEM_WALK_MIB} avmm.rounds={rounds}"


def check_walk(*parts: str, rounds: int = MEM_WALK_ROUNDS) -> None:
    """The outputs of the guest's successive homes make one uninterrupted walk: every
    round once, in order, the first CRCs as the host computes them, ``verify=ok``."""
    output = "".join(parts)
    lines = mem_walk_lines(output)
    assert rounds_printed(output) == list(range(1, rounds + 1)), output[-2000:]
    assert lines[:CHECKED_ROUNDS] == _EXPECTED_START
    assert lines[-1] == f"{PREFIX}mem-walk done rounds={rounds} verify=ok"


class Receiver:
    """``tests.migration.receiver`` in a new process: a destination listening at
    ``address``; :meth:`start` returns once it listens."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.process: trio.Process | None = None
        self.listening = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> int:
        import os
        import subprocess
        import sys

        from tests.vm.helpers import REPO

        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.migration.receiver", self.address],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.process = process
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None and process.stderr is not None
                nursery.start_soon(self._pump, process.stdout, self.stdout)
                nursery.start_soon(self._pump, process.stderr, self.stderr)
                with trio.fail_after(TIMEOUT_S):
                    while b"listening " not in self.stderr:
                        if process.returncode is not None:
                            raise AssertionError(f"the receiver ended: {self.stderr.decode()}")
                        await trio.sleep(0.02)
                task_status.started()
                return await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    @staticmethod
    async def _pump(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    @property
    def listen_address(self) -> str:
        line = self.stderr.split(b"listening ", 1)[1].split(b"\n", 1)[0]
        return line.decode()


def check_refused_after_commit(error: BaseException, source: VirtualMachine,
                               end: VmExit) -> None:
    """The destination could not start the guest after COMMIT and said so (ERROR, not
    silence): the source's migration failed and its guest runs on there; the
    destination ended ``error`` saying why."""
    assert not isinstance(error, HandOverUnconfirmed), error
    assert "could not start" in str(error), error
    assert source.state is VmState.RUNNING
    assert source.migration is not None and source.migration.state == "failed"
    assert end.reason is StopReason.ERROR, end
    assert "could not start" in end.detail, end
