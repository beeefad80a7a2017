"""The config a destination builds from the stream: the source's CPU controls travel
with it; a config given on the destination decides them instead (its host's CPUs, its
own limits), and then the source's affinity is not even checked against this host.

And the stream's opening as a jailed worker's daemon reads it to plan the jail of an
incoming VM given no config (header and CONFIG frame only, bounded, refused as the
destination refuses), which the worker's destination reads again first."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from avmm.config import VmConfig
from avmm.migration.destination import (
    OPENING_CONFIG_MAX,
    StreamedConfigError,
    receive_config,
    receive_opening,
    streamed_config,
)
from avmm.migration.errors import MigrationError
from avmm.migration.stream import ERROR, FRAME_HEADER, HEADER, ROUND, VERSION, Channel, Kind
from avmm.migration.transport import Accepted, Listener, listen, parse_address
from avmm.paths import PathPolicy
from avmm.state.codec import encode
from avmm.state.vm_state import config_to_state
from tests.vm.helpers import guest_config, with_machine

#: A host CPU this host does not have (the source's was bigger).
ABSENT_CPU = max(os.sched_getaffinity(0)) + 1000


def _with_machine(**keys: object) -> VmConfig:
    return with_machine(guest_config("avmm.test=hello"), **keys)


def _payload(config: object) -> bytes:
    state = config_to_state(config)  # type: ignore[arg-type]
    return encode(state)


def test_the_source_cpu_controls_come_with_the_stream() -> None:
    source = _with_machine(cpu_weight=300, cpu_max_percent=60.5)
    built = streamed_config(_payload(source), None)
    assert (built.machine.cpu_weight, built.machine.cpu_max_percent) == (300, 60.5)


def test_a_given_config_decides_the_cpu_controls_on_this_host() -> None:
    source = _with_machine(cpu_weight=300, cpu_affinity=(ABSENT_CPU,))
    payload = _payload(source)
    # Without a config of its own, this host cannot place the vCPUs where the source did.
    with pytest.raises(MigrationError, match="cpu_affinity"):
        streamed_config(payload, None)
    given = _with_machine(cpu_weight=50)
    built = streamed_config(payload, given)  # type: ignore[arg-type]
    assert (built.machine.cpu_weight, built.machine.cpu_affinity) == (50, None)
    assert built.machine.memory_mib == source.machine.memory_mib  # type: ignore[attr-defined]


# -- the opening a jailed worker's daemon reads (avmm.migration.destination) -------------

def test_a_source_never_chooses_this_hosts_output_files(tmp_path: Path) -> None:
    """With no config given, the source names the VM's devices, but its serial and
    console go to the VM's console stream: a file or socket the source named could be
    another tenant's file, which an output truncates. A given config's outputs stand."""
    import dataclasses

    from avmm.config import ConsoleConfig, SerialConfig

    victim = tmp_path / "someone-elses.img"
    victim.write_bytes(b"precious")
    source = dataclasses.replace(
        guest_config("avmm.test=hello"),
        serial=SerialConfig(mode="file", path=victim),
        console=ConsoleConfig(mode="socket", path=tmp_path / "console.sock"))
    built = streamed_config(_payload(source), None)
    assert (built.serial.mode, built.serial.path) == ("console", None)
    assert built.console is not None
    assert (built.console.mode, built.console.path) == ("console", None)
    given = dataclasses.replace(guest_config("avmm.test=hello"), serial=SerialConfig(
        mode="file", path=tmp_path / "mine.log"), console=ConsoleConfig(mode="console"))
    merged = streamed_config(_payload(source), given)
    assert (merged.serial.mode, merged.serial.path) == ("file", tmp_path / "mine.log")
    assert victim.read_bytes() == b"precious"


def test_a_streamed_config_is_held_to_the_daemons_path_policy(tmp_path: Path) -> None:
    """Its paths must lie in the daemon's allowed directories, as a posted config's; the
    source is told only that the config cannot be used (not which file, nor whether it
    exists: no oracle of this host's files)."""
    import dataclasses

    from avmm.config import DiskConfig

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.img").write_bytes(bytes(4096))
    (outside / "secret.img").write_bytes(bytes(4096))
    policy = PathPolicy([allowed])

    def config(disk: Path) -> bytes:
        return _payload(dataclasses.replace(guest_config("avmm.test=hello"),
                                            disks=(DiskConfig(path=disk),)))

    built = streamed_config(config(allowed / "ok.img"), None, path_check=policy.check)
    assert built.disks[0].path == allowed / "ok.img"
    for disk in (outside / "secret.img", outside / "missing.img"):
        with pytest.raises(StreamedConfigError) as refused:
            streamed_config(config(disk), None, path_check=policy.check)
        assert str(disk) in str(refused.value)
        assert str(tmp_path) not in refused.value.public
    # No policy given (none mode without --allow-path): as before.
    assert streamed_config(config(outside / "secret.img"), None).disks[0].path == (
        outside / "secret.img")


def _opening_bytes() -> tuple[bytes, bytes]:
    """A stream's header and CONFIG frame, and a ROUND frame that would follow READY."""
    header = HEADER.build({"version": VERSION, "writer": "test"})
    config = encode(config_to_state(_with_machine()))
    opening = header + FRAME_HEADER.build({"kind": Kind.CONFIG, "length": len(config)}) \
        + config
    marker = ROUND.build({"round": 0, "pages_dirty": 7})
    return opening, FRAME_HEADER.build({"kind": Kind.ROUND, "length": len(marker)}) + marker


async def _source(path: Path, data: bytes, answer: bytearray) -> None:
    """Connect, send ``data``, keep what comes back until the other side closes."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                answer += chunk


def _listener(path: Path, accept_timeout_s: float | None = None) -> Listener:
    return listen(parse_address(f"unix:{path}", listen=True), PathPolicy(),
                  accept_timeout_s=accept_timeout_s)


def _refusal(answer: bytes) -> str:
    assert answer[0] == Kind.ERROR, answer[:20]
    (length,) = struct.unpack_from("<I", answer, 1)
    return str(ERROR.parse(answer[5:5 + length]).message)


async def test_the_opening_is_read_exactly_and_read_again_first_by_the_worker(
    tmp_path: Path,
) -> None:
    """The daemon reads the header and CONFIG frame and nothing after them; the
    worker's channel, given the connection and those bytes, reads the whole stream
    as if nothing had been read before: the same frames, the same SHA-256."""
    opening_data, after = _opening_bytes()
    listener = _listener(tmp_path / "in.sock")
    answer = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_source, tmp_path / "in.sock", opening_data + after, answer)
        opening = await receive_opening(listener)
        assert not (tmp_path / "in.sock").exists()  # one connection, then no listener
        assert opening.received == opening_data
        assert opening.config == streamed_config(opening_data[-len(
            encode(config_to_state(_with_machine()))):], None)
        # The worker's copy of the connection (SCM_RIGHTS gives it a new fd).
        copy = socket.socket(fileno=os.dup(opening.stream.socket.fileno()))
        await opening.stream.aclose()
        accepted = Accepted(parse_address(f"unix:{tmp_path / 'in.sock'}", listen=True),
                            copy, opening.received)
        stream = await accepted.accept_one()
        accepted.close()  # taken: the stream's now
        channel = Channel(stream)
        config = await receive_config(channel, None)
        assert config == opening.config
        kind, payload = await channel.receive()
        assert kind is Kind.ROUND and ROUND.parse(payload).pages_dirty == 7
        await channel.hashed()
        assert channel.received_digest.digest() == \
            hashlib.sha256(opening_data + after).digest()
        assert channel.bytes_received == len(opening_data + after)
        await stream.aclose()
    assert answer == b""


@pytest.mark.parametrize("case", ["too large", "pages first", "silent", "garbage"])
async def test_a_bad_opening_is_refused_and_the_source_told(tmp_path: Path,
                                                           case: str) -> None:
    """Bounded in size (checked before the payload is read) and time; the same checks
    as the destination's; the source gets the line in an ERROR frame."""
    header = HEADER.build({"version": VERSION, "writer": "test"})
    data, words = {
        "too large": (header + FRAME_HEADER.build(
            {"kind": Kind.CONFIG, "length": OPENING_CONFIG_MAX + 1}), "at most"),
        "pages first": (header + FRAME_HEADER.build({"kind": Kind.PAGES, "length": 2})
                        + b"\0\0", "PAGES frame before CONFIG"),
        "silent": (b"", "no config within 0.5 s"),
        "garbage": (bytes(64), "magic"),
    }[case]
    listener = _listener(tmp_path / "in.sock")
    answer = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_source, tmp_path / "in.sock", data, answer)
        with trio.fail_after(10), pytest.raises(MigrationError, match=words):
            await receive_opening(listener, timeout_s=0.5)
    assert words in _refusal(answer), answer
    assert not (tmp_path / "in.sock").exists()


async def test_no_source_within_the_accept_timeout(tmp_path: Path) -> None:
    listener = _listener(tmp_path / "in.sock", accept_timeout_s=0.2)
    with trio.fail_after(10), pytest.raises(MigrationError, match="no source connected"):
        await receive_opening(listener)
    assert not (tmp_path / "in.sock").exists()
