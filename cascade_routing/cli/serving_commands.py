"""`cascade-routing` subcommands of the serving stage."""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this stage's subcommands (each sets `func`)."""
