"""Agreement among the answers that ran: the masked pairwise similarity and its per-model mean.

One rule for the hand-made features (:func:`~cascade_routing.estimators.features.compose_features`)
and the network's embedding-space agreement (:class:`~cascade_routing.estimators.network.QualityNetwork`),
so an unrun model's answer can never enter either.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_agreement(pair_sim: Tensor, ran: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(sim [B, M, M], agreement [B, M])`` in ``dtype`` for similarities ``pair_sim`` [B, M, M] and the
    bool mask ``ran`` [B, M]:

    ``sim_mk = ran_m ran_k [m≠k] · pair_sim_mk`` (0 elsewhere, whatever ``pair_sim`` holds there) and
    ``agreement_m = Σ_k sim_mk / max(1, Σ_{k≠m} ran_m ran_k)`` (0 for an unrun m).
    """
    rf = ran.to(dtype)
    eye = torch.eye(ran.shape[1], dtype=dtype, device=ran.device)
    pair = rf.unsqueeze(2) * rf.unsqueeze(1) * (1 - eye)
    sim = torch.where(pair.bool(), pair_sim.to(dtype), torch.zeros((), dtype=dtype))
    agree = sim.sum(-1) / pair.sum(-1).clamp_min(1.0)
    return sim, agree
