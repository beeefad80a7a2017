"""Guest-visible behaviour through avmm: serial input, and ring-0 int3 (which on hosts
whose KVM emulator refuses it goes through avmm's #BP fallback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from avmm import StopReason, VirtualMachine

from .helpers import MAILBOX_ADDRESS, REPO, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.mark.parametrize("count", [1, 3, 25])
async def test_int3_in_ring0_reaches_the_guests_breakpoint_handler(count: int) -> None:
    async with VirtualMachine(guest_config(f"avmm.test=int3 avmm.n={count}")) as vm:
        output = bytearray()
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
        assert vm.memory is not None
        assert vm.memory.read_u64(MAILBOX_ADDRESS + 8) == count
    # The guest checks each #BP frame (RIP just past the 0xCC, CS, RFLAGS, RSP).
    assert f"avmm-testguest: int3 ok count={count}" in output.decode()
    assert result.reason is StopReason.RESET, output.decode()


async def test_serial_input_reaches_the_guest_through_vm_serial() -> None:
    lines = [b"hello", b"second line with spaces", b"x" * 150]
    async with VirtualMachine(guest_config("avmm.test=echo")) as vm:
        output = bytearray()
        with trio.fail_after(30):
            while b"echo ready\n" not in output:
                output += await vm.serial.receive_some()
            # More than the 64-byte receive FIFO at once: send_all waits for room.
            await vm.serial.send_all(b"\n".join(lines) + b"\nquit\n")
            async for chunk in vm.serial:
                output += chunk
        result = await vm.wait()
    text = output.decode()
    for line in lines:
        assert f"avmm-testguest: echo {line.decode()}\n" in text
    assert text.endswith("avmm-testguest: echo bye\n")
    assert result.reason is StopReason.RESET


def test_avmm_up_forwards_stdin_to_the_serial_port() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "avmm.cli", "up", str(REPO / "examples" / "hello.toml"),
         "--append", "avmm.test=echo"],
        input="typed on stdin\nquit\n", capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "avmm-testguest: echo typed on stdin\n" in result.stdout
    assert "avmm-testguest: echo bye\n" in result.stdout
