"""The back-end SDK's limiter with a guest: ``avmm backend blk --iops N`` serves the test
guest's blk-bench at the limited rate. The back-end says at exit what its limiter did
(requests admitted, held, time waited); elapsed time is checked only as a lower bound
(noise can only make it larger): the requests past the bucket's first fill cannot have
been served faster than the limit allows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from avmm import StopReason
from tests.vhost.test_frontend import avmm_backend, blk_config, random_image, run

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

IOPS = 50
REQUESTS = 150


def _limiter_line(stderr: bytes) -> dict[str, object]:
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("{") and '"rate limiter at exit"' in line:
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError(f"no limiter line in the back-end's log: {stderr[-2000:]!r}")


async def test_a_limited_backend_serves_the_guest_at_its_limit(tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "blk.sock"
    with avmm_backend("blk", sock, "--image", str(image), "--iops", str(IOPS),
                      "--log-format", "json") as process:
        start = time.monotonic()
        result, output, _ = await run(blk_config(
            f"avmm.test=blk-bench avmm.rw=read avmm.qd=1 avmm.n={REQUESTS}", sock))
        elapsed = time.monotonic() - start
        assert process.poll() is None
    assert f"blk-bench rw=read qd=1 n={REQUESTS} done" in output, output
    assert result.reason is StopReason.RESET
    # The bucket starts full (IOPS tokens); the rest come at IOPS per second.
    assert elapsed >= (REQUESTS - IOPS) / IOPS, elapsed
    stats = _limiter_line(process.captured[1])  # type: ignore[attr-defined]
    assert stats["device"] == "blk0"
    # Every request of the guest (and the driver's few of its own) went through it,
    # and most of those past the first fill were held (the guest asks far faster than
    # IOPS; a slow, loaded host lets the bucket refill a little between requests, so
    # the bounds leave room for that rather than count exactly).
    assert isinstance(stats["admitted_ops"], int) and stats["admitted_ops"] >= REQUESTS
    assert isinstance(stats["throttled"], int)
    assert stats["throttled"] >= (REQUESTS - IOPS) // 2, stats
    waited = stats["wait_seconds"]
    assert isinstance(waited, dict) and waited["ops"] >= (REQUESTS - IOPS) / IOPS / 2


async def test_an_unlimited_backend_logs_no_limiter(tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "blk.sock"
    with avmm_backend("blk", sock, "--image", str(image), "--log-format", "json") as process:
        result, output, _ = await run(blk_config(
            "avmm.test=blk-bench avmm.rw=read avmm.qd=1 avmm.n=20", sock))
    assert result.reason is StopReason.RESET, output
    assert b"rate limiter at exit" not in process.captured[1]  # type: ignore[attr-defined]
