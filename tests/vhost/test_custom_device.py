"""examples/counting_rng.py: a device written in a few lines, served to QEMU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_backend_qemu import run_guest, vhost_device

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]


def test_counting_rng_example_serves_qemu(test_guest: Path, tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    server = subprocess.Popen([sys.executable, str(REPO / "examples" / "counting_rng.py"),
                               str(sock)], cwd=REPO, stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None, server.communicate()[1].decode()
            assert time.monotonic() < deadline, "the example never listened"
            time.sleep(0.02)
        status, lines = run_guest(test_guest, "avmm.test=rng",
                                  vhost_device("vhost-user-rng", sock))
    finally:
        server.terminate()
        server.communicate(timeout=10)
    assert f"avmm-testguest: rng0 {bytes(range(32)).hex()}" in lines
    assert status == 0
