"""Fixtures shared with tests/api (a daemon over a fake or real Host) and tests/vm (a tap
with an echoer in a network namespace)."""

from tests.api.conftest import api, fake_host, kernel_file, socket_dir
from tests.vm.conftest import echoing_tap

__all__ = ["api", "echoing_tap", "fake_host", "kernel_file", "socket_dir"]
