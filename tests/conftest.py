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

import os
import shutil
from pathlib import Path

import pytest
import structlog

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
TEST_GUEST = BUILD / "guest" / "testguest.elf"
DEBIAN_KERNEL = BUILD / "debian-kernel" / "vmlinuz"

REQUIRE = os.environ.get("AVMM_REQUIRE_KVM") == "1"


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def _qemu_problem() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (make deps installs it)"
    return None


def _debian_kernel_problem() -> str | None:
    if not DEBIAN_KERNEL.exists():
        return f"{DEBIAN_KERNEL} is missing (make debian-kernel fetches it)"
    return None


def _guest_problem() -> str | None:
    if not TEST_GUEST.exists():
        return f"{TEST_GUEST} is missing (make guest builds it)"
    return None


_CHECKS = {
    "kvm": _kvm_problem,
    "qemu": _qemu_problem,
    "debian_kernel": _debian_kernel_problem,
    "guest": _guest_problem,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: needs the built test guest (make guest)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, check in _CHECKS.items():
        if item.get_closest_marker(marker) is None:
            continue
        problem = check()
        if problem is None:
            continue
        if REQUIRE:
            pytest.fail(f"prerequisite missing and AVMM_REQUIRE_KVM=1: {problem}", pytrace=False)
        pytest.skip(f"prerequisite missing: {problem}")


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


def pytest_terminal_summary(terminalreporter: object) -> None:
    if not _FIGURES:
        return
    reporter: object = terminalreporter
    reporter.section("avmm figures (measured, not asserted)")  # type: ignore[attr-defined]
    for name, value in _FIGURES:
        reporter.write_line(f"{name}: {value}")  # type: ignore[attr-defined]
