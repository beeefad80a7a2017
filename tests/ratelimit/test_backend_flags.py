"""`avmm backend blk|net` rate-limit flags: what they parse to, and the device they set up."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from avmm.ratelimit import BucketConfig, RateLimitConfig
from avmm.vhost import cli as backend_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    backend_cli.add_backend_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_blk_flags_give_the_device_its_limiter(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    served: list[Any] = []
    monkeypatch.setattr(backend_cli, "run_backend",
                        lambda device, *args, **kwargs: served.append(device) or 0)
    args = parse("backend", "blk", "--socket", str(tmp_path / "s"), "--image", str(image),
                 "--iops", "500", "--bandwidth", "8M", "--bandwidth-burst", "1MiB")
    assert args.handler(args) == 0
    (device,) = served
    assert device.throttle.limiter.config == RateLimitConfig(
        ops=BucketConfig(size=500, refill_ms=1000),
        bandwidth=BucketConfig(size=8 << 20, refill_ms=1000, one_time_burst=1 << 20))
    served.clear()
    args = parse("backend", "blk", "--socket", str(tmp_path / "s"), "--image", str(image))
    args.handler(args)
    assert served[0].throttle is None


def test_net_flags_limit_each_direction_on_its_own() -> None:
    from avmm.ratelimit._flags import limit_from_arguments

    args = parse("backend", "net", "--socket", "/s", "--tap", "t0", "--tx-pps", "2000",
                 "--rx-bandwidth", "10M")
    assert limit_from_arguments(args, "tx-", ops_name="pps") == RateLimitConfig(
        ops=BucketConfig(size=2000, refill_ms=1000))
    assert limit_from_arguments(args, "rx-", ops_name="pps") == RateLimitConfig(
        bandwidth=BucketConfig(size=10 << 20, refill_ms=1000))


@pytest.mark.parametrize("value", ["-1", "fast", "1T", str((1 << 40) + 1)])
def test_bad_rates_are_usage_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse("backend", "blk", "--socket", "/s", "--image", "/i", "--iops", value)
    assert caught.value.code == 2
    assert "--iops" in capsys.readouterr().err


def test_net_command_puts_the_limiters_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import avmm.tap

    class NoTap:
        fd, name = -1, "t0"

        def close(self) -> None:
            pass

    monkeypatch.setattr(avmm.tap.Tap, "open", staticmethod(lambda name: NoTap()))
    served: list[Any] = []
    monkeypatch.setattr(backend_cli, "run_backend",
                        lambda device, *args, **kwargs: served.append(device) or 0)
    args = parse("backend", "net", "--socket", "/s", "--tap", "t0", "--rx-pps", "100")
    assert args.handler(args) == 0
    (device,) = served
    assert device.tx_throttle is None
    assert device.rx_throttle.limiter.config == RateLimitConfig(
        ops=BucketConfig(size=100, refill_ms=1000))
