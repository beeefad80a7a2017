"""A VM whose build fails at any step releases everything it took (fds, threads), and
the build never runs on the event loop.

The failures are injected from here (monkeypatching the recipe's step guard and the
console task), so the product carries no test-only switches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

import avmm.vm
from avmm.config import ConsoleConfig, DiskConfig, RngConfig, SerialConfig, VmConfig
from avmm.errors import VmStartError
from avmm.host import Host
from avmm.lifecycle import StopReason
from avmm.vm import VirtualMachine
from tests.vm.helpers import guest_config

if TYPE_CHECKING:
    from avmm.paths import BoundSocket

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def busy_threads() -> int:
    """OS threads of this process, less trio's idle cached workers (they carry their
    default name while idle and leave after 10 s on their own)."""
    idle = sum(1 for thread in threading.enumerate() if thread.name.startswith("Trio thread "))
    return len(os.listdir("/proc/self/task")) - idle


async def settle_to(baseline: tuple[int, int], timeout: float = 60) -> tuple[int, int]:
    """Wait until (fds, busy threads) are back at ``baseline``; return the last sample."""
    deadline = trio.current_time() + timeout
    while True:
        now = (open_fds(), busy_threads())
        if now == baseline or trio.current_time() > deadline:
            return now
        await trio.sleep(0.05)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avmm-bf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def full_config(directory: Path, name: str, cmdline: str = "avmm.test=hello") -> VmConfig:
    """The test guest with 2 vCPUs, a disk, rng, a console socket and a serial log: a
    build with every kind of step."""
    disk = directory / "disk.img"
    if not disk.exists():
        disk.write_bytes(bytes(1 << 20))
    return dataclasses.replace(
        guest_config(cmdline, vcpus=2, name=name,
                     serial=SerialConfig(mode="file", path=directory / f"{name}.log")),
        disks=(DiskConfig(path=disk),),
        rng=RngConfig(),
        console=ConsoleConfig(mode="socket", path=directory / f"{name}.sock"),
    )


async def test_twenty_vms_failing_at_each_step_in_turn_leak_nothing(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_step = VirtualMachine._step
    steps_seen: dict[str, list[str]] = {}
    fail_at: dict[str, int] = {}

    @contextlib.contextmanager
    def step(self: VirtualMachine, name: str) -> Iterator[None]:
        seen = steps_seen.setdefault(self.name, [])
        seen.append(name)
        with original_step(self, name):
            yield
            # After the step's own work: what it acquired must be released as well.
            if fail_at.get(self.name) == len(seen) - 1:
                raise OSError(errno.EIO, f"injected failure in {name!r}")

    original_console = avmm.vm.serve_console_socket

    async def console_task(listener: BoundSocket, *args: object, **kwargs: object) -> None:
        if fail_at.get(listener.path.stem) == -1:  # the socket is named after the VM
            raise OSError(errno.EIO, "injected failure starting the console socket")
        await original_console(listener, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(VirtualMachine, "_step", step)
    monkeypatch.setattr(avmm.vm, "serve_console_socket", console_task)

    async with Host() as host:
        # A full run first: one-time things (the kick handler, lazily loaded modules)
        # are not leaks.
        warm = await host.create(full_config(short_dir, "warm"))
        assert (await warm.wait()).reason is StopReason.RESET
        await host.remove(warm.id)
        steps = steps_seen["warm"]
        assert len(steps) >= 10, steps
        await trio.sleep(0.1)
        baseline = (open_fds(), busy_threads())

        # Every build step in turn, then the device tasks' start (-1), cycling to 20.
        plan = [*range(len(steps)), -1]
        for index in range(20):
            name = f"fail{index}"
            fail_at[name] = plan[index % len(plan)]
            with pytest.raises(VmStartError) as info:
                await host.create(full_config(short_dir, name))
            expected = steps[fail_at[name]] if fail_at[name] >= 0 else "starting the device tasks"
            assert info.value.step == expected, info.value
            assert "injected failure" in str(info.value)
            assert not (short_dir / f"{name}.sock").exists()
        assert host.list() == []
        assert await settle_to(baseline) == baseline

        # And a VM built after all that still runs.
        again = await host.create(full_config(short_dir, "again"))
        assert (await again.wait()).reason is StopReason.RESET


async def test_the_build_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """While one VM builds, the event loop goes on: the build waits for a trio task to
    run, which it could never do if the build held the loop."""
    ran = threading.Event()
    original = avmm.vm.load_kernel

    def slow_load_kernel(*args: object, **kwargs: object) -> object:
        # Up to 20 s for the event loop to run the ticker task.
        saw_the_loop = ran.wait(20)
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        if not saw_the_loop:
            raise AssertionError("the event loop did not run while the VM was built")
        return result

    monkeypatch.setattr(avmm.vm, "load_kernel", slow_load_kernel)

    async def ticker() -> None:
        await trio.sleep(0.05)
        ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with VirtualMachine(guest_config("avmm.test=hello")) as vm:
            assert (await vm.wait()).reason is StopReason.RESET


async def test_a_fifo_swapped_in_for_the_serial_log_is_refused_without_waiting(
        tmp_path: Path) -> None:
    """A config validated against a regular file, whose file became a FIFO before the
    VM opened it: the open does not wait for a reader, the build fails naming the key,
    and nothing is left behind."""
    fifo = tmp_path / "serial.log"
    os.mkfifo(fifo)
    # A reader turns up after a while: if the build waited for it, it would go on and
    # succeed, which is the failure this test is about.
    reader_fds: list[int] = []

    def late_reader() -> None:
        time.sleep(5)
        reader_fds.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=late_reader)
    thread.start()
    try:
        config = guest_config("avmm.test=hello",
                              serial=SerialConfig(mode="file", path=fifo))
        before = open_fds()
        with trio.fail_after(60), pytest.raises(VmStartError) as info:
            async with VirtualMachine(config):
                pass
        assert info.value.bad_input
        assert "serial.path" in str(info.value) and "FIFO" in str(info.value)
        assert await settle_to((before, busy_threads())) == (before, busy_threads())
    finally:
        thread.join()
        for fd in reader_fds:
            os.close(fd)


async def test_a_regular_file_at_the_console_socket_path_is_never_deleted(
        short_dir: Path) -> None:
    precious = short_dir / "console.sock"
    precious.write_text("keep me\n")
    config = dataclasses.replace(guest_config("avmm.test=hello"),
                                 console=ConsoleConfig(mode="socket", path=precious))
    with trio.fail_after(60), pytest.raises(VmStartError) as info:
        async with VirtualMachine(config):
            pass
    assert "not a socket" in str(info.value) and "console.path" in str(info.value)
    assert info.value.bad_input
    assert precious.read_text() == "keep me\n"


async def test_a_console_socket_that_cannot_be_bound_fails_the_start_cleanly(
        short_dir: Path) -> None:
    """Too long for sun_path: one VmStartError naming the step, nothing leaked, and the
    caller's cancel scopes intact (it used to corrupt the nursery stack)."""
    long_path = short_dir / ("c" * 120 + ".sock")
    config = dataclasses.replace(guest_config("avmm.test=hello"),
                                 console=ConsoleConfig(mode="socket", path=long_path))
    before = (open_fds(), busy_threads())
    for _ in range(3):
        with trio.fail_after(60), pytest.raises(VmStartError) as info:
            async with VirtualMachine(config):
                pass
        assert "console" in info.value.step
        assert "unix socket path" in str(info.value)
    assert await settle_to(before) == before
    # The caller's nursery and cancel scopes still work.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    with trio.move_on_after(0.01):
        await trio.sleep(1)
