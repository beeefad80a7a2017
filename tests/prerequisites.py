"""What a test needs from the machine, and the one rule for when it is missing.

A missing prerequisite is a visible skip with the reason, except when
``AVMM_REQUIRE_KVM=1`` (CI sets it): then it is a failure, so that CI never passes by
skipping. Tests declare needs with markers (see conftest.py) or call :func:`require`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
TEST_GUEST = BUILD / "guest" / "testguest.elf"
DEBIAN_KERNEL = BUILD / "debian-kernel" / "vmlinuz"

REQUIRE = os.environ.get("AVMM_REQUIRE_KVM") == "1"


def require(problem: str | None) -> None:
    """Skip (or, under AVMM_REQUIRE_KVM=1, fail) the running test if ``problem``."""
    if problem is None:
        return
    if REQUIRE:
        pytest.fail(f"prerequisite missing and AVMM_REQUIRE_KVM=1: {problem}", pytrace=False)
    pytest.skip(f"prerequisite missing: {problem}")


def kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def qemu_problem() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (make deps installs it)"
    return None


def debian_kernel_problem() -> str | None:
    if not DEBIAN_KERNEL.exists():
        return f"{DEBIAN_KERNEL} is missing (make debian-kernel fetches it)"
    return None


def guest_problem() -> str | None:
    if not TEST_GUEST.exists():
        return f"{TEST_GUEST} is missing (make guest builds it)"
    return None


def net_problem() -> str | None:
    """Taps and network namespaces: root (CAP_NET_ADMIN), /dev/net/tun, iproute2."""
    if os.geteuid() != 0:
        return "tap and netns tests need root (CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist (modprobe tun)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    return None


def not_expected_on_this_host(reason: str) -> None:
    """Skip a test of something this host is known not to support (not a prerequisite
    that could be installed, so CI skips it too, with ``reason`` in its summary). Use it
    only where the README says so and says what is tested on such hosts instead."""
    pytest.skip(f"not expected on this host: {reason}")
