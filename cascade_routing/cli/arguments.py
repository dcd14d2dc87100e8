"""Argument types shared by the subcommands: a bad value is an argparse error naming the option."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (e.g. budgets per pair, bootstrap resamples, a token window)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (e.g. a thread count where 0 means the library's default)."""
    return _int_at_least(text, 0)
