"""Argument types shared by the subcommands: a bad value is an argparse error naming the option."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (e.g. budgets per pair, bootstrap resamples, a token window)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
