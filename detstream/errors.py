"""The one base of detstream's own exceptions.

Every exception class the package defines derives from ``DetstreamError`` (a test walks the
modules to hold that), so a caller can catch all of detstream's failures with one clause. Each
class keeps its other, standard base (``RuntimeError``, ``OSError``, ``ValueError``...), so code
that catches those still catches it: ``class DiskFull(DetstreamError, OSError)``.
"""

from __future__ import annotations

__all__ = ["DetstreamError"]


class DetstreamError(Exception):
    """A failure that detstream itself reports (not a bug of the caller's or a third party's)."""
