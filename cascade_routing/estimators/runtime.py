"""CPU thread setting for the estimator commands.

Measured on the shared 2-core machine (other processes busy): a batch of 64 Newton-free logistic
fits took 36.5 s with 2 intra-op threads and 1.7 s with 1; MiniLM encoding was also faster with 1.
Oversubscribed OpenMP threads spin against other processes, so the commands default to 1 thread;
set ``CASCADE_ROUTING_NUM_THREADS=2`` on an idle machine.
"""

from __future__ import annotations

import os

import torch


def configure_threads(default: int = 1) -> int:
    """``torch.set_num_threads`` from ``$CASCADE_ROUTING_NUM_THREADS`` (else ``default``); returns it."""
    raw = os.environ.get("CASCADE_ROUTING_NUM_THREADS")
    try:
        n = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"CASCADE_ROUTING_NUM_THREADS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"CASCADE_ROUTING_NUM_THREADS must be a positive integer, got {raw!r}")
    torch.set_num_threads(n)
    return n

