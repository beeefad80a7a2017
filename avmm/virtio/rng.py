"""virtio-rng, the entropy device (virtio 1.2 §5.4), fed from the host's getrandom().

One queue (requestq). The driver makes device-writable buffers available; the device
fills them with random bytes and returns each chain with the number of bytes written.
At most :data:`MAX_REQUEST_BYTES` go into one chain (the spec lets the device use less
than the whole buffer; the driver reads the used length), which bounds the work and
memory one request can cost.

A chain with device-readable buffers breaks the driver's rule ("MUST NOT place
device-readable buffers into the requestq") and puts the device in NEEDS_RESET.

Random bytes come from ``getrandom()`` without blocking: if the host's pool is not yet
initialised (early host boot), ``os.urandom`` supplies them instead of stalling the
event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import structlog

from ..devices._state import check_state_class
from .device import DeviceContext, DeviceId, DeviceNeedsReset, VirtioDevice, serve_queue

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import DescriptorChain

log = structlog.get_logger(__name__)

__all__ = ["MAX_REQUEST_BYTES", "RngDevice", "RngState", "RngStats"]

#: The most bytes one request (descriptor chain) is given.
MAX_REQUEST_BYTES = 64 * 1024
QUEUE_SIZE = 256


@dataclass(frozen=True)
class RngState:
    """An entropy device has nothing of its own to save (every request is answered at
    once); the class exists so that it is saved and restored like every device, and a
    later version can add fields."""

    STATE_VERSION: ClassVar[int] = 1


@dataclass
class RngStats:
    """Counters since the device was made."""

    requests: int = 0
    bytes: int = 0


def _random_bytes(count: int) -> bytes:
    try:
        return os.getrandom(count, os.GRND_NONBLOCK)
    except BlockingIOError:
        return os.urandom(count)


class RngDevice(VirtioDevice):
    """A virtio entropy device; it has no configuration and no feature bits."""

    device_id = DeviceId.ENTROPY
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, *, name: str = "rng0") -> None:
        self.name = name
        self.stats = RngStats()

    def device_features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(max(size, 0))

    state_class = RngState

    def save_state(self) -> RngState:
        return RngState()

    def restore_state(self, state: RngState) -> None:
        check_state_class(state, RngState, self.name)

    async def run(self, context: DeviceContext) -> None:
        await serve_queue(context, 0, partial(self._fill, context.memory))

    async def _fill(self, memory: MemoryAccess, chain: DescriptorChain) -> int:
        if chain.readable:
            raise DeviceNeedsReset(
                f"entropy request {chain.head} has device-readable buffers "
                "(the requestq takes device-writable buffers only)"
            )
        wanted = min(chain.writable_length, MAX_REQUEST_BYTES)
        written = chain.write(memory, _random_bytes(wanted)) if wanted else 0
        self.stats.requests += 1
        self.stats.bytes += written
        return written
