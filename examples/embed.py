"""Run VMs inside your own trio program.

Boots two test-guest VMs at the same time from one process, collects each one's serial
output, and prints how each ended:

    .venv/bin/python examples/embed.py

(`make guest` builds the test guest first; `make up` does too.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

import avmm
from avmm.config import SerialConfig

HERE = Path(__file__).resolve().parent


async def run_vm(name: str, extra_cmdline: str, results: dict[str, str]) -> None:
    config = avmm.load_config(HERE / "hello.toml")
    # Keep the output for ourselves instead of writing it to the terminal.
    config = dataclasses.replace(config, serial=SerialConfig(mode="none", path=None))
    config = config.with_cmdline_appended(extra_cmdline)

    output = bytearray()
    async with avmm.VirtualMachine(config, name=name) as vm:
        async for chunk in vm.serial:  # ends when the VM stops
            output += chunk
        result = await vm.wait()
    results[name] = f"{name}: {result}\n" + output.decode()


async def main() -> None:
    avmm.configure_logging(level="warning")  # structlog prints everything otherwise
    results: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_vm, "greeter", "greeting=from-the-first-vm", results)
        nursery.start_soon(run_vm, "counter", "avmm.test=count avmm.n=200000000", results)
    for name in sorted(results):
        print(results[name], end="")


if __name__ == "__main__":
    trio.run(main)
