"""The management API's fixtures (a daemon over a fake or real Host), shared with tests/api."""

from tests.api.conftest import api, fake_host, kernel_file, socket_dir

__all__ = ["api", "fake_host", "kernel_file", "socket_dir"]
