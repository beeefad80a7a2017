"""A destination in its own process, for migration tests:
``python -m tests.migration.receiver ADDRESS``.

It listens at ADDRESS (``VirtualMachine.receive``), prints ``listening ADDRESS`` on
stderr once it does, copies the guest's serial output to stdout, and at the end prints
``exit REASON: DETAIL`` and ``migration STATE`` on stderr; it exits 0 if the guest ran
and ended without a failure, 3 if the incoming migration failed.
"""

from __future__ import annotations

import sys

import trio

from avmm import StopReason, VirtualMachine
from avmm.logs import configure_logging


async def main(address: str) -> int:
    async with VirtualMachine.receive(address) as vm:
        assert vm.migration is not None
        print(f"listening {vm.migration.address}", file=sys.stderr, flush=True)
        stdout = trio.lowlevel.FdStream(1)
        async for chunk in vm.serial:
            await stdout.send_all(chunk)
        result = await vm.wait()
    print(f"exit {result.reason.value}: {result.detail}", file=sys.stderr, flush=True)
    state = vm.migration.state if vm.migration else None
    print(f"migration {state}", file=sys.stderr, flush=True)
    if result.reason is StopReason.ERROR:
        return 3
    return 1 if result.failed else 0


if __name__ == "__main__":
    configure_logging(level="info")
    sys.exit(trio.run(main, sys.argv[1]))
