"""The errors of the state package: one line each, saying what to fix."""

from __future__ import annotations

from ..errors import StateError


class SnapshotError(StateError):
    """A snapshot cannot be written or read: a missing, truncated or corrupt file, a
    format or state version this avmm does not read, a state that does not fit the VM
    or host it is restored on. ``str()`` is one line naming the file where there is one."""


class StateCompatibilityError(SnapshotError):
    """This host (its KVM, CPU or TSC) cannot run the saved guest faithfully."""
