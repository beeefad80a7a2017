"""Fixtures of the virtqueue and device tests."""

from .blk_paths import blk_path
from .net_paths import net_path

__all__ = ["blk_path", "net_path"]
