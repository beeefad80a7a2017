"""Fixtures for tests that boot VMs with devices."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.prerequisites import net_problem, require
from tests.virtio_guest_support import echoing_tap as _echoing_tap


@pytest.fixture
def echoing_tap() -> Iterator[tuple[str, str]]:
    """(tap name, network namespace): a tap, up, inside a fresh network namespace, with
    a host-side echoer bound to it that reflects the guest's 0x88B5 test frames."""
    require(net_problem())
    with _echoing_tap() as (namespace, _echoer):
        yield namespace.tap, namespace.netns
