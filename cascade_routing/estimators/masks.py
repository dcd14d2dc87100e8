"""Ran-mask helpers (pure torch): enumeration, bitmask ids, random masks."""

from __future__ import annotations

import torch
from torch import Tensor

from cascade_routing.interfaces import bitmask  # noqa: F401  (the ran-set id, defined with the protocol)


def all_masks(num_models: int) -> Tensor:
    """Bool [2^M, M]; row s has model m set iff bit m of s is 1 (so row s has bitmask id s)."""
    s = torch.arange(2**num_models)
    return (s.unsqueeze(1) >> torch.arange(num_models)) & 1 == 1


def random_ran_masks(num: int, num_models: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """[num, M] masks: size k uniform in 0..M, then a uniform subset of that size (drawn from
    ``generator``, or torch's global generator of ``device`` when None)."""
    k = torch.randint(0, num_models + 1, (num,), generator=generator, device=device)
    scores = torch.rand(num, num_models, generator=generator, device=device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < k.unsqueeze(1)
