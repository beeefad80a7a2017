"""Which CPU profile a VM gets, and what the ``compat`` profile adds to the command line.

``cpu_profile = "auto"`` (the default) picks ``compat`` on a host whose KVM is known to
refuse ring-0 instructions that stock Linux uses, and ``host`` everywhere else, so the
same vm.toml boots on both. Detected today: the paravirtual ``kvm_pvm`` module (guest
ring 0 is interpreted and KVM's emulator fails on ``xrstor``, ``popcnt``, ``clac``/``stac``
and ``lock cmpxchg16b``; see PEERS.md). On ordinary hardware KVM ``auto`` is ``host`` and
nothing below applies.

``compat`` does two things, both logged when a VM starts:

* CPUID: hides the features KVM lets a VMM hide (CX16; see
  :data:`avmm.arch.x86.cpuid.PROFILES`);
* the kernel command line: :data:`COMPAT_CMDLINE` is put in front of the configured
  words, for what KVM_SET_CPUID2 cannot hide there (a Linux guest then avoids XSAVE
  state, POPCNT, SMAP and FSGSBASE), and with :data:`PVM_SYSCALL_FAULT_OPT_IN`, which
  lets avmm's minimal kernel run a ``syscall`` that such a KVM delivers as a user-mode
  fault at the kernel's entry point (examples/linux/patches/; any other kernel ignores
  the word). Words from the config come later and win where Linux takes the last one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

ResolvedProfile = Literal["host", "compat"]

#: The minimal kernel's opt-in for its kvm_pvm quirk patch: without it that kernel handles
#: a user-mode fault at its system call entry as any other fault (SIGSEGV); with it, as
#: the system call it was, after checking that it was one and with the flags a user
#: process may hold. A dotted word: other kernels take it for an unknown module's
#: parameter and ignore it.
PVM_SYSCALL_FAULT_OPT_IN: Final = "avmm.pvm_syscall_fault=1"

#: Kernel parameters the compat profile adds (Linux ignores the ones it does not know).
COMPAT_CMDLINE: Final = f"noxsave clearcpuid=popcnt,smap,fsgsbase {PVM_SYSCALL_FAULT_OPT_IN}"

#: Kernel modules whose presence means "use compat" (a KVM that interprets ring 0).
_COMPAT_KVM_MODULES: Final = ("kvm_pvm",)


def host_needs_compat(sys_module: Path = Path("/sys/module")) -> bool:
    """True on a host whose KVM needs the compat profile (see the module docstring)."""
    return any((sys_module / name).is_dir() for name in _COMPAT_KVM_MODULES)


def resolve_cpu_profile(profile: str, sys_module: Path = Path("/sys/module")) -> ResolvedProfile:
    """``auto`` → ``compat`` or ``host`` for this host; the others as given."""
    if profile == "auto":
        return "compat" if host_needs_compat(sys_module) else "host"
    if profile not in ("host", "compat"):
        raise ValueError(f"unknown CPU profile {profile!r}")
    return "compat" if profile == "compat" else "host"


def profile_cmdline(profile: ResolvedProfile) -> str:
    """Words the resolved profile puts in front of the configured command line."""
    return COMPAT_CMDLINE if profile == "compat" else ""
