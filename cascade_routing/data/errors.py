"""Errors of the data stage (every module of ``cascade_routing.data`` raises these)."""

from __future__ import annotations


class DatasetError(ValueError):
    """Raised when routing data is malformed; the message names the file, row, model or field."""
