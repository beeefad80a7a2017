"""Fixtures for the management API: a daemon on a short-lived unix socket, backed by a
fake Host (HTTP-layer tests on any machine) or the real one (tests that boot VMs)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient, serve_api

from .fake_host import FakeHost


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path: unix socket paths are limited to 107 bytes,
    which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix="avmm-api-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel_file(tmp_path: Path) -> Path:
    """A regular file that passes config validation as a kernel (the fake host boots
    nothing)."""
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF fake")
    return path


@pytest.fixture
def fake_host() -> FakeHost:
    return FakeHost()


@pytest.fixture
async def api(nursery: trio.Nursery, socket_dir: Path, fake_host: FakeHost
              ) -> AsyncIterator[ApiClient]:
    """A client of a daemon serving ``fake_host`` on ``socket_dir/avmm.sock``."""
    path = await nursery.start(serve_api, fake_host, socket_dir / "avmm.sock")
    async with ApiClient(path) as client:
        yield client
