"""Fixtures of the virtqueue and device tests."""

from .net_paths import net_path

__all__ = ["net_path"]
