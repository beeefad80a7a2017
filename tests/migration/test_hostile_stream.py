"""A destination reads a hostile stream safely: a wrong magic or version, an unknown
frame kind, a frame larger than any valid one, frames out of order, a page batch whose
counts do not add up or that names a page outside RAM, a damaged state section, an END
whose SHA-256 does not match. Each time the incoming VM ends without ever running, its
exit detail says why in one line, and the sender gets that line in an ERROR frame."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.migration.stream import (
    END,
    FRAME_HEADER,
    HEADER,
    KIND_DATA,
    KIND_ZERO,
    MAX_FRAME,
    MAX_FRAME_PAGES,
    MAX_FRAME_RUNS,
    ROUND,
    VERSION,
    Channel,
    Kind,
    build_pages,
)
from avmm.state.codec import encode
from avmm.state.vm_state import config_to_state

from .support import guest_config

pytestmark = [pytest.mark.kvm]

MIB = 1 << 20
PAGES_IN_RAM = 32 * MIB // 4096


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.build({"kind": kind, "length": len(payload)}) + payload


def header(version: int = VERSION) -> bytes:
    return HEADER.build({"version": version, "writer": "hostile"})


CONFIG = frame(Kind.CONFIG, encode(config_to_state(guest_config("", memory_mib=32))))


def raw_pages(runs: list[tuple[int, int, int]], data: bytes = b"", *,
              count: int | None = None) -> bytes:
    """A PAGES frame of ``runs`` (first, pages, kind) and ``data``; ``count`` claims
    another number of runs than it holds."""
    return frame(Kind.PAGES, struct.pack("<H", len(runs) if count is None else count)
                 + b"".join(struct.pack("<QIB", *run) for run in runs) + data)


# name -> (bytes after the connection opens, the words the refusal must hold)
CASES: dict[str, tuple[bytes, str]] = {
    "not a migration stream": (b"GET / HTTP/1.1\r\n\r\n" + bytes(32), "magic"),
    "another version": (header(VERSION + 1) + CONFIG, "version"),
    "pages before the config": (header() + frame(Kind.PAGES, b"\0\0"), "before CONFIG"),
    "an unknown frame kind": (header() + CONFIG + frame(99), "unknown frame kind 99"),
    "a frame too large": (header() + CONFIG + FRAME_HEADER.build(
        {"kind": Kind.PAGES, "length": MAX_FRAME + 1}), "bytes (at most"),
    "a page outside RAM": (header() + CONFIG + frame(Kind.PAGES, build_pages(
        [(PAGES_IN_RAM, 1, KIND_ZERO)])), f"guest RAM has {PAGES_IN_RAM}"),
    "a run past the end of RAM": (header() + CONFIG + raw_pages(
        [(PAGES_IN_RAM - 1, 2, KIND_ZERO)]), f"guest RAM has {PAGES_IN_RAM}"),
    "a huge page number": (header() + CONFIG + raw_pages([(1 << 63, 1, KIND_ZERO)]),
                           "guest RAM has"),
    "a huge run": (header() + CONFIG + raw_pages([(1, (1 << 32) - 1, KIND_ZERO)]),
                   "guest RAM has"),
    "data shorter than its pages": (header() + CONFIG + raw_pages(
        [(1, 2, KIND_DATA)], bytes(4096)), "need"),
    "data longer than its pages": (header() + CONFIG + raw_pages(
        [(1, 1, KIND_DATA)], bytes(2 * 4096)), "it carries 8192"),
    "an unknown page kind": (header() + CONFIG + raw_pages([(1, 1, 7)]),
                             "unknown page kind"),
    "an empty batch": (header() + CONFIG + raw_pages([]), "0 runs"),
    "an empty run": (header() + CONFIG + raw_pages([(1, 0, KIND_ZERO)]), "empty run"),
    "too many runs": (header() + CONFIG + raw_pages(
        [(1, 1, KIND_ZERO)] * (MAX_FRAME_RUNS + 1)), f"runs (1..{MAX_FRAME_RUNS})"),
    "too many data pages": (header() + CONFIG + raw_pages(
        [(0, MAX_FRAME_PAGES + 1, KIND_DATA)]), "data pages (at most"),
    "fewer runs than its count": (header() + CONFIG + raw_pages(
        [(1, 1, KIND_ZERO)], count=3), "shorter than its runs"),
    "no run count": (header() + CONFIG + frame(Kind.PAGES, b"\1"),
                     "shorter than its run count"),
    "a damaged state": (header() + CONFIG + frame(Kind.STATE, b"AVMMSNAP" + bytes(40)),
                        "streamed state"),
    "END before the state": (header() + CONFIG + frame(Kind.ROUND, ROUND.build(
        {"round": 0, "pages_dirty": 0})), ""),  # END added below with a valid digest
    "END with a wrong digest": (header() + CONFIG, "SHA-256"),
    "a config that is not one": (header() + frame(Kind.CONFIG, b"\x07garbage"),
                                 "streamed config"),
}


async def send_hostile(address: str, data: bytes, finish: Callable[[Channel], bytes] | None,
                       ) -> str:
    """Connect, send ``data`` (READY is read after the config), return the ERROR line
    the destination answers with ("" if the connection just closed)."""
    stream = await trio.open_unix_socket(address.removeprefix("unix:"))
    async with stream:
        channel = Channel(stream)
        await stream.send_all(data)
        channel.sent_digest.update(data)
        try:
            with trio.fail_after(60):
                while True:
                    kind, _ = await channel.receive()
                    if kind is Kind.READY and finish is not None:
                        await stream.send_all(finish(channel))
        except Exception as e:  # the ERROR frame (PeerError) or the end of the stream
            return str(e)


@pytest.mark.parametrize("case", list(CASES))
async def test_a_hostile_stream_is_refused(tmp_path: Path, case: str) -> None:
    data, words = CASES[case]
    finish = None
    if case == "END before the state":
        def finish(channel: Channel) -> bytes:
            return frame(Kind.END, END.build({"pages_sent": 0,
                                              "sha256": channel.sent_digest.digest()}))
        words = "before the STATE"
    elif case == "END with a wrong digest":
        def finish(channel: Channel) -> bytes:
            return frame(Kind.END, END.build({"pages_sent": 0, "sha256": bytes(32)}))
    address = f"unix:{tmp_path / 'in.sock'}"
    with trio.fail_after(120):
        async with VirtualMachine.receive(address) as vm:
            answer = await send_hostile(address, data, finish)
            end = await vm.wait()
    assert vm.state is VmState.STOPPED
    assert end.reason is StopReason.ERROR
    assert words in end.detail, end.detail
    assert "\n" not in end.detail
    assert words in answer, answer
    assert vm.migration is not None and vm.migration.state == "failed"


async def test_leaving_an_incoming_vm_before_anything_came(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    async with VirtualMachine.receive(f"unix:{path}") as vm:
        assert vm.state is VmState.INCOMING and path.exists()
    assert vm.state is VmState.STOPPED
    assert not path.exists()
    assert vm.migration is not None and vm.migration.state == "failed"


async def test_leaving_an_incoming_vm_while_it_receives(tmp_path: Path) -> None:
    """The sender is told (ERROR), the machine built for it is released."""
    address = f"unix:{tmp_path / 'in.sock'}"
    stream = None
    async with VirtualMachine.receive(address) as vm:
        stream = await trio.open_unix_socket(address.removeprefix("unix:"))
        channel = Channel(stream)
        await stream.send_all(header() + CONFIG)
        kind, _ = await channel.receive()
        assert kind is Kind.READY and vm.memory is not None
    assert vm.state is VmState.STOPPED
    with pytest.raises(Exception, match="the VM was stopped before the hand-over"):
        await channel.receive()
    await stream.aclose()
