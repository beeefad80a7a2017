"""Shared test plumbing.

Prerequisites are declared with markers, never checked ad hoc inside a test:

* ``@pytest.mark.kvm``            needs a usable /dev/kvm
* ``@pytest.mark.qemu``           needs qemu-system-x86_64
* ``@pytest.mark.debian_kernel``  needs the Debian cloud bzImage (``make debian-kernel``)
* ``@pytest.mark.guest``          needs the built test guest (``make guest``)

A missing prerequisite is a visible skip with the reason, except when
``AVMM_REQUIRE_KVM=1`` (set by CI), where it is a failure: CI must never pass by skipping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from tests.prerequisites import (
    DEBIAN_KERNEL,
    TEST_GUEST,
    debian_kernel_problem,
    guest_problem,
    kvm_problem,
    net_problem,
    qemu_problem,
    require,
)

_CHECKS = {
    "kvm": kvm_problem,
    "qemu": qemu_problem,
    "debian_kernel": debian_kernel_problem,
    "guest": guest_problem,
    "net": net_problem,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: needs the built test guest (make guest)")
    config.addinivalue_line("markers", "net: needs root, /dev/net/tun and iproute2")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, check in _CHECKS.items():
        if item.get_closest_marker(marker) is not None:
            require(check())


@pytest.fixture
def test_guest() -> Path:
    """Path to the built test guest ELF (mark the test with ``guest``)."""
    return TEST_GUEST


@pytest.fixture
def debian_kernel() -> Path:
    """Path to the Debian cloud bzImage (mark the test with ``debian_kernel``)."""
    return DEBIAN_KERNEL


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    """Each test starts with structlog's defaults; a test that configures logging (the
    CLI does) must not leave its sink behind for the next test."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


# -- figures: measurements printed at the end of the run, never asserted ---------------

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figure() -> object:
    """``figure("blk-crc IOPS", f"{iops:.0f}")`` records a measurement that is printed in
    the summary at the end of the run (speed targets belong in benchmarks, not asserts)."""

    def record(name: str, value: str) -> None:
        _FIGURES.append((name, value))

    return record


#: What the device fuzzers reached (tests/virtio/test_fuzz_*.py): one line per device.
_FUZZ_COUNTS: list[str] = []


@pytest.fixture
def fuzz_report() -> object:
    """``fuzz_report(line)`` records a fuzzer's counts, printed in their own section at
    the end of the run (the tests assert on them; this shows them)."""
    return _FUZZ_COUNTS.append


def pytest_terminal_summary(terminalreporter: object) -> None:
    reporter: object = terminalreporter
    if _FUZZ_COUNTS:
        reporter.section("avmm fuzzers (chains each device reached)")  # type: ignore[attr-defined]
        for line in _FUZZ_COUNTS:
            reporter.write_line(line)  # type: ignore[attr-defined]
    if not _FIGURES:
        return
    reporter.section("avmm figures (measured, not asserted)")  # type: ignore[attr-defined]
    for name, value in _FIGURES:
        reporter.write_line(f"{name}: {value}")  # type: ignore[attr-defined]
