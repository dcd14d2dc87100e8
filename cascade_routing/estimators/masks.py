"""Ran-mask helpers (pure torch): enumeration, bitmask ids, random masks, the ran-sets a table covers."""

from __future__ import annotations

from typing import Sequence

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


def covered_ran_sets(num_models: int, max_run: int | None, chains: Sequence[Sequence[int]] = ()) -> Tensor:
    """Sorted long ids of the ran-sets a per-ran-set table covers: every set with at most ``max_run``
    models run (None: all ``2^M`` sets), plus every prefix of each ``chain`` (model indices in run
    order, e.g. a cascade's chain, whose prefixes may be longer than ``max_run``)."""
    ids = torch.arange(2**num_models)
    keep = torch.ones_like(ids, dtype=torch.bool) if max_run is None else all_masks(num_models).sum(1) <= max_run
    for chain in chains:
        prefix = 0
        for j in chain:
            if not 0 <= int(j) < num_models:
                raise ValueError(f"chain {list(chain)} names model index {j}; there are {num_models} models")
            prefix |= 1 << int(j)
            keep[prefix] = True
    return ids[keep]


def ran_set_names(state: int, models: Sequence[str]) -> list[str]:
    """The model names of ran-set id ``state`` (bit m set iff ``models[m]`` ran)."""
    return [name for j, name in enumerate(models) if state >> j & 1]


def on_all_sets(table: Tensor, ids: Tensor, num_models: int) -> Tensor:
    """A per-ran-set table [S, ...] for the sets ``ids`` [S] as the full [2^M, ...] table: its rows at
    ``ids``, NaN in every other row (``table`` itself when ``ids`` are all 2^M sets in order)."""
    if ids.numel() == 2**num_models:
        return table
    out = torch.full((2**num_models, *table.shape[1:]), float("nan"), dtype=table.dtype)
    out[ids] = table
    return out
