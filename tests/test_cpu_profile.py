"""``cpu_profile = "auto"``: compat exactly where the host's KVM needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from avmm.config import MachineConfig
from avmm.cpu_profile import (
    COMPAT_CMDLINE,
    PVM_SYSCALL_FAULT_OPT_IN,
    profile_cmdline,
    resolve_cpu_profile,
)

PATCHES = Path(__file__).resolve().parent.parent / "examples" / "linux" / "patches"


def test_auto_is_the_default() -> None:
    assert MachineConfig().cpu_profile == "auto"


def test_auto_picks_compat_on_a_paravirtual_kvm(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    assert resolve_cpu_profile("auto", tmp_path) == "host"
    (tmp_path / "kvm_pvm").mkdir()
    assert resolve_cpu_profile("auto", tmp_path) == "compat"


@pytest.mark.parametrize("profile", ["host", "compat"])
def test_explicit_profiles_are_kept(profile: str, tmp_path: Path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    assert resolve_cpu_profile(profile, tmp_path) == profile


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="fast"):
        resolve_cpu_profile("fast")


def test_only_compat_adds_command_line_words() -> None:
    assert profile_cmdline("host") == ""
    assert profile_cmdline("compat") == COMPAT_CMDLINE
    assert "noxsave" in COMPAT_CMDLINE.split()


def test_only_compat_opts_in_to_the_syscall_fault_patch() -> None:
    """The minimal kernel's kvm_pvm quirk patch acts only with this word
    (examples/linux/patches/; tests/linux/ check what it does with and without it)."""
    name, value = PVM_SYSCALL_FAULT_OPT_IN.split("=")
    patches = "".join(path.read_text() for path in PATCHES.glob("*.patch"))
    assert f'+early_param("{name}",' in patches and value == "1"
    assert PVM_SYSCALL_FAULT_OPT_IN in profile_cmdline("compat").split()
    assert PVM_SYSCALL_FAULT_OPT_IN not in profile_cmdline("host").split()


def test_compat_words_come_before_the_configured_ones() -> None:
    from avmm.vm import kernel_cmdline
    from tests.vm.helpers import guest_config

    config = guest_config("console=ttyS0 clearcpuid=avx", acpi=True)
    assert kernel_cmdline(config, [], "compat") == f"{COMPAT_CMDLINE} console=ttyS0 clearcpuid=avx"
    assert kernel_cmdline(config, [], "host") == "console=ttyS0 clearcpuid=avx"
