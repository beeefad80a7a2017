"""The test guest's ``net-echo`` with ``avmm.resend_ms`` (tests/guest/README.md): a frame
whose echo does not come back in time is sent again, and the run goes on. The protocol
the in-flight live migration test (tests/migration/test_net.py) relies on."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from avmm import VirtualMachine
from tests.prerequisites import net_problem, require
from tests.traffic_support import SequenceEchoer, net_echo
from tests.virtio_guest_support import TapNamespace

from .helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

FRAMES = 10
TIMEOUT_S = 120


async def run_echo(cmdline: str, echoer_options: dict[str, object]) -> tuple[str, list[int],
                                                                             bool]:
    """Run net-echo with ``cmdline`` against a :class:`SequenceEchoer`: the guest's
    output, the sequences the echoer saw, and whether the guest exited 0."""
    require(net_problem())
    output = bytearray()
    with TapNamespace() as namespace, SequenceEchoer(
            namespace.tap, netns=namespace.netns, lifetime=TIMEOUT_S,
            **echoer_options) as echoer:  # type: ignore[arg-type]
        config = net_echo(guest_config(cmdline, memory_mib=64), namespace)
        with trio.fail_after(TIMEOUT_S):
            async with VirtualMachine(config) as vm:
                async for chunk in vm.serial:
                    output += chunk
                end = await vm.wait()
        seen = echoer.sequences()
    return output.decode(errors="replace"), seen, end.exit_status == 0 and not end.failed


async def test_a_frame_lost_once_is_resent_and_the_run_goes_on() -> None:
    text, seen, ok = await run_echo(
        f"avmm.test=net-echo avmm.n={FRAMES} avmm.resend_ms=300",
        {"drop_first": frozenset({3})})
    assert ok, text
    assert f"net0 echoed={FRAMES}\n" in text, text
    resent = int(text.split("net0 resent=")[1].split()[0])
    assert resent >= 1, text
    counts = Counter(seen)
    assert counts[3] >= 2, seen  # the first copy dropped, a resend answered
    assert set(counts) == set(range(1, FRAMES + 1)), seen
    assert sum(counts.values()) == FRAMES + resent, seen  # every copy sent reached the tap


async def test_without_resend_ms_a_lost_frame_ends_the_run_as_before() -> None:
    """The default is unchanged: no resend, the 5 s timeout names the frame, and no
    ``resent=`` line."""
    text, seen, ok = await run_echo(
        "avmm.test=net-echo avmm.n=5", {"drop_first": frozenset({3})})
    assert not ok, text
    assert "net0 timeout (no echo of seq=3," in text, text
    assert "resent=" not in text and "echoed=" not in text, text
    assert seen == [1, 2, 3], seen


async def test_resend_ms_without_loss_resends_nothing() -> None:
    text, seen, ok = await run_echo(
        f"avmm.test=net-echo avmm.n={FRAMES} avmm.resend_ms=4000", {})
    assert ok, text
    lines = [line for line in text.splitlines() if " net0 " in line]
    assert lines[-2:] == [f"avmm-testguest: net0 echoed={FRAMES}",
                          "avmm-testguest: net0 resent=0"], text
    assert seen == list(range(1, FRAMES + 1)), seen

