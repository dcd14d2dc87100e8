"""CPU thread setting for the estimator commands, and the check of a requested torch device.

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


def checked_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or ``ValueError`` naming the device when it is not a device name or
    this torch build cannot use it (a CUDA device on a CPU-only build or a machine without a GPU,
    an index past the GPUs there are, MPS where it is unavailable)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device name ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available; use cpu")
    return dev
