"""Command-line spellings of limits: ``--iops 500``, ``--bandwidth 8M`` (per second).

A rate ``R`` per second becomes a bucket of ``R`` tokens refilled in 1000 ms: at most one
second's worth goes through at once after an idle spell, then ``R`` per second. The
optional burst is the bucket's ``one_time_burst``.
"""

from __future__ import annotations

import argparse
import re
from typing import Final

from ._bucket import BUCKET_SIZE_MAX, BucketConfig, RateLimitConfig

__all__ = ["RATE_MAX", "add_limit_arguments", "limit_from_arguments", "per_second",
           "rate_argument"]

#: The largest rate: a bucket of one second's worth, at most the largest bucket.
RATE_MAX: Final = BUCKET_SIZE_MAX
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_RATE = re.compile(r"(\d+)\s*([kKmMgG]?)(?:i?[bB])?")


def rate_argument(text: str) -> int:
    """An argparse type: a count, or bytes with a binary suffix (``8M``, ``512KiB``),
    from 0 (no bucket) to :data:`RATE_MAX`."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a number, optionally with K, M or G (binary units), got {text!r}")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value > RATE_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {RATE_MAX}")
    return value


def per_second(rate: int, burst: int = 0) -> BucketConfig | None:
    """``rate`` per second as a bucket; 0 means no bucket."""
    if rate <= 0:
        return None
    return BucketConfig(size=rate, refill_ms=1000, one_time_burst=burst)


def add_limit_arguments(parser: argparse.ArgumentParser, prefix: str, *, ops_name: str,
                        ops_unit: str, what: str) -> None:
    """``--{prefix}{ops_name}``, ``--{prefix}bandwidth`` and their ``-burst`` forms."""
    parser.add_argument(f"--{prefix}{ops_name}", type=rate_argument, default=None,
                        metavar="N", help=f"limit {what} to N {ops_unit} per second")
    parser.add_argument(f"--{prefix}bandwidth", type=rate_argument, default=None,
                        metavar="BYTES", help=f"limit {what} to BYTES per second (K, M, G: "
                                              "binary units)")
    parser.add_argument(f"--{prefix}{ops_name}-burst", type=rate_argument, default=0,
                        metavar="N", help=f"let N {ops_unit} through once, on top")
    parser.add_argument(f"--{prefix}bandwidth-burst", type=rate_argument, default=0,
                        metavar="BYTES", help="let BYTES through once, on top")


def limit_from_arguments(args: argparse.Namespace, prefix: str, *,
                         ops_name: str) -> RateLimitConfig | None:
    """The limit the flags of :func:`add_limit_arguments` ask for (None: unlimited)."""
    dest = prefix.replace("-", "_")
    ops = getattr(args, f"{dest}{ops_name}")
    bandwidth = getattr(args, f"{dest}bandwidth")
    config = RateLimitConfig(
        bandwidth=None if bandwidth is None else per_second(
            bandwidth, getattr(args, f"{dest}bandwidth_burst")),
        ops=None if ops is None else per_second(ops, getattr(args, f"{dest}{ops_name}_burst")))
    return None if config.unlimited else config
