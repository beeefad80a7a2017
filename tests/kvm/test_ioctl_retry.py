"""KVM ioctls interrupted by a signal before doing anything are retried, except KVM_RUN."""

from __future__ import annotations

import errno

import pytest

from avmm.errors import KvmError
from avmm.kvm import _ioctl


class _InterruptedOnce:
    """Stands in for the cffi lib: the first call fails with EINTR, the next succeeds."""

    KVM_CREATE_VM = 0xAE01
    KVM_RUN = 0xAE80

    def __init__(self, failures: int = 1) -> None:
        self.calls = 0
        self.failures = failures

    def ioctl(self, fd: int, number: int, argument: object) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            _ioctl.ffi.errno = errno.EINTR
            return -1
        return 7


def test_eintr_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _InterruptedOnce(failures=3)
    monkeypatch.setattr(_ioctl, "lib", fake)
    assert _ioctl.ioctl(3, "KVM_CREATE_VM", 0) == 7
    assert fake.calls == 4


def test_kvm_run_eintr_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _InterruptedOnce()
    monkeypatch.setattr(_ioctl, "lib", fake)
    with pytest.raises(KvmError):
        _ioctl.ioctl(3, "KVM_RUN", 0)
    assert fake.calls == 1
