"""A virtio device in a few lines of Python, served to any VMM over vhost-user.

``CountingRng`` is an entropy device (virtio device ID 4) whose "random" bytes count
up: 00 01 02 ... ff 00 01 ...  Useless as entropy, handy to see that the bytes a guest
reads really come from this file. Serve it with

    .venv/bin/python examples/counting_rng.py /tmp/rng.sock

and point a vhost-user front-end at the socket, e.g. QEMU:

    qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem \\
        -object memory-backend-memfd,id=mem,size=64M,share=on -m 64 \\
        -global virtio-mmio.force-legacy=false \\
        -chardev socket,id=vu,path=/tmp/rng.sock -device vhost-user-rng,chardev=vu ...

The test guest's ``avmm.test=rng`` scenario then prints ``rng0 000102...1f``.
"""

from __future__ import annotations

import sys

import trio

from avmm.vhost.backend import serve_device
from avmm.virtio.device import DeviceContext, DeviceId, VirtioDevice, serve_queue
from avmm.virtio.queue import DescriptorChain


class CountingRng(VirtioDevice):
    device_id = DeviceId.ENTROPY
    queue_max_sizes = (64,)
    name = "counting-rng"

    def __init__(self) -> None:
        self.next_byte = 0  # all the device's state, in one plain attribute

    def device_features(self) -> int:
        return 0  # nothing beyond what every avmm device offers

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)  # virtio-rng has no config space

    async def run(self, context: DeviceContext) -> None:
        async def fill(chain: DescriptorChain) -> int:
            data = bytes((self.next_byte + i) & 0xFF for i in range(chain.writable_length))
            self.next_byte = (self.next_byte + len(data)) & 0xFF
            return chain.write(context.memory, data)

        await serve_queue(context, 0, fill)

    def reset(self) -> None:
        self.next_byte = 0


if __name__ == "__main__":
    trio.run(serve_device, CountingRng(), sys.argv[1])
