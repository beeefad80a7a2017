"""Helpers for VM-level snapshot tests: boot the test guest, stop it mid-run, snapshot
it, restore it in a new ``avmm up --restore`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from avmm import VirtualMachine
from avmm.config import SerialConfig, VmConfig
from tests.vm.helpers import REPO, guest_config

AVMM = [sys.executable, "-m", "avmm.cli"]
TIMEOUT_S = 180
MEM_WALK_MIB = 16
MEM_WALK_ROUNDS = 8
MEM_WALK = (f"avmm.test=mem-walk avmm.mib={MEM_WALK_MIB} "
            f"avmm.rounds={MEM_WALK_ROUNDS}")


def console_config(cmdline: str, **kwargs: object) -> VmConfig:
    """The test guest with its serial port on stdout: what ``avmm up --restore`` of its
    snapshot prints."""
    return guest_config(cmdline, serial=SerialConfig(mode="console"), **kwargs)  # type: ignore[arg-type]


async def read_until(vm: VirtualMachine, output: bytearray, text: str) -> None:
    """Read the guest's serial output into ``output`` until it holds ``text``."""
    with trio.fail_after(TIMEOUT_S):
        while text.encode() not in output:
            chunk = await vm.serial.receive_some()
            assert chunk, f"the guest stopped before printing {text!r}: {output.decode()}"
            output += chunk


async def drain(vm: VirtualMachine, output: bytearray) -> None:
    """Take what the (paused) guest printed and is still buffered."""
    while True:
        with trio.move_on_after(0.3):
            chunk = await vm.serial.receive_some()
            if not chunk:
                return
            output += chunk
            continue
        return


async def snapshot_at(vm: VirtualMachine, output: bytearray, text: str, path: Path) -> str:
    """Let the running guest get to ``text``, pause it a moment later, snapshot it into
    ``path``; its output so far."""
    await read_until(vm, output, text)
    await trio.sleep(0.01)
    await vm.pause()
    await drain(vm, output)
    await vm.snapshot(path)
    return output.decode()


async def snapshot_mid_walk(path: Path, after_round: int = 2, **kwargs: object) -> str:
    """Boot mem-walk, snapshot it inside the round after ``after_round``, stop it; its
    output up to the snapshot."""
    async with VirtualMachine(console_config(MEM_WALK, **kwargs)) as vm:
        before = await snapshot_at(vm, bytearray(), f"mem-walk round={after_round} crc=",
                                   path)
        vm.stop()
    assert "done" not in before, "the guest finished before the snapshot: nothing to test"
    return before


async def avmm(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """``avmm ARGS`` in a new process (stdin from /dev/null), its output captured."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*AVMM, *args], capture_stdout=True, capture_stderr=True, check=False,
            stdin=subprocess.DEVNULL, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


async def restore_in_new_process(path: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return await avmm("up", "--restore", str(path), *extra)


async def run_to_end(config: VmConfig) -> str:
    """The whole serial output of a run nothing interrupted."""
    async with VirtualMachine(config) as vm:
        output = bytearray()
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    assert not result.failed, result
    return output.decode()
