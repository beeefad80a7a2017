"""Pieces shared by the legacy devices."""

from __future__ import annotations

from avmm.errors import AvmmError


class DeviceStateError(AvmmError):
    """A saved device state cannot be restored (a field is out of range or malformed)."""
