"""A fresh process that runs ``K`` test-guest VMs (scenario ``count`` with a huge N, so
each sits in its ring-3 loop without VM exits), waits until every guest is in that loop,
and prints one JSON line with this process's memory from /proc/self/status.

``python -m benchmarks.memchild K``. Guest RAM is a shared memfd per VM, so the pages the
guests touched show up as ``RssShmem``; ``VmRSS - RssShmem`` is the VMM's own memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import trio

from benchmarks.common import avmm_config, quiet_logging, status_of

MAILBOX_ADDRESS = 0x200000
MAILBOX_MAGIC = 0x584F424C49414D41
SPIN_N = 1 << 60
READY_TIMEOUT_S = 60


async def main(count: int) -> dict[str, object]:
    from avmm import VirtualMachine

    before = status_of(os.getpid())
    async with contextlib.AsyncExitStack() as stack:
        vms = []
        for i in range(count):
            config = avmm_config(f"avmm.test=count avmm.n={SPIN_N}", name=f"mem{i}")
            vms.append(await stack.enter_async_context(VirtualMachine(config)))  # type: ignore[arg-type]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for vm in vms:
            assert vm.memory is not None
            while not (vm.memory.read_u64(MAILBOX_ADDRESS) == MAILBOX_MAGIC
                       and vm.memory.read_u64(MAILBOX_ADDRESS + 8) > 0):
                if vm.exit is not None or time.monotonic() > deadline:
                    raise SystemExit(f"VM {vm.name} never reached its loop: {vm.exit}")
                await trio.sleep(0.01)
        status = status_of(os.getpid())
        for vm in vms:
            vm.stop("measured")
    return {"vms": count, "before": before, "status": status}


MARKER = "avmm-bench-memory: "

if __name__ == "__main__":
    quiet_logging()
    print(MARKER + json.dumps(trio.run(main, int(sys.argv[1]))), flush=True)
