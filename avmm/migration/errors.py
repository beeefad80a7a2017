"""The one error a migration raises."""

from __future__ import annotations

from ..errors import AvmmError


class MigrationError(AvmmError):
    """A migration could not be done, or failed half-way; on the source the VM runs on
    as before. The message is one line saying what went wrong and where."""
