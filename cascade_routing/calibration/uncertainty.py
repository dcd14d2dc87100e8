"""Uncertainty of the learned estimates: a calibrated variance head vs residual covariances per ran-set.

The quantity both describe is the residual ``r = p(all) − p(ran)``: how much a model's probability
estimate will still move once every model has run (the paper's notion; it drives E[max]).

- Variance head: ``σ²_m = c_m · exp(logvar_m)``, with the per-model calibration factor
  ``c_m = mean(r_m² / exp(logvar_m))`` over calibration rows × random ran-masks (so the head's
  scale is fitted on held-out data).
- Residual covariance (the paper): for every ran-set s (bitmask, ``Σ_m ran_m 2^m``),
  ``Σ_s = Cov_{i ∈ calibration}(p_i(all) − p_i(s))`` [M, M], the same for every query. The table
  may be computed for some ran-sets only (``sets``): the cost is one network pass per (row, set).

:func:`calibration_report` compares them on held-out rows: mean Gaussian NLL of r under each
marginal σ (lower is better) and the coverage of the central 90% interval ``|r| ≤ 1.645σ``
(ideal 0.90), over unrun cells of random non-full masks.
"""

from __future__ import annotations

import math

import torch
from typing import TYPE_CHECKING

from torch import Tensor

from cascade_routing.estimators.features import compose_features
from cascade_routing.estimators.masks import all_masks, bitmask, on_all_sets, random_ran_masks
from cascade_routing.estimators.network import QualityNetwork
from cascade_routing.estimators.residuals import ResidualMoments

if TYPE_CHECKING:
    from cascade_routing.training.datamodule import EncodedSplit

Z90 = 1.6448536269514722
REPORT_MASKS_PER_ROW, REPORT_SEED = 4, 1  # the random ran-masks :func:`calibration_report` scores by default


@torch.no_grad()
def split_predictions(
    network: QualityNetwork, split: "EncodedSplit", rows: Tensor, ran: Tensor, batch_size: int = 2048
) -> tuple[Tensor, Tensor]:
    """``(p, logvar)`` [len(rows), M] for split rows ``rows`` under masks ``ran`` (training-time data)."""
    network.eval()
    ps, lvs = [], []
    for s in range(0, rows.numel(), batch_size):
        r, m = rows[s : s + batch_size], ran[s : s + batch_size]
        feat = compose_features(split.static[r], split.pair_sim[r], m)
        prep = network.prepare_answers(split.answer_emb[r])
        logit, logvar = network.forward_prepared(split.query_emb[r], m, prep, feat, split.task[r], split.query_feat[r])
        ps.append(torch.sigmoid(logit))
        lvs.append(logvar)
    return torch.cat(ps), torch.cat(lvs)


@torch.no_grad()
def residual_moments(network: QualityNetwork, split: "EncodedSplit", rows_per_chunk: int = 8,
                     sets: Tensor | None = None, sets_per_pass: int = 512) -> tuple[Tensor, Tensor]:
    """``(covariance, second moment)``, each [2^M, M, M]: ``Cov_i(p_i(all) − p_i(s))`` and
    ``E_i[r_i r_iᵀ]`` (the spread around 0, which also counts a systematic shift of the estimate once
    more models have run) for every ran-set s of ``sets`` (long ids; None: all 2^M) over the rows of
    ``split``, NaN rows for the other sets; from one pass of the network over every (row, ran-set of
    ``sets``) pair: the pass is the cost (N · |sets| forward rows). An entry depends only on its own
    set's pass, so it is the same whichever ``sets`` are asked.

    The network runs on one row and at most ``sets_per_pass`` ran-sets at a time
    (:meth:`~QualityNetwork.forward_ran_sets`: the query branch once for the whole split, the answer
    branch on run cells only; the same function as the per-row forward pass, and on routerbench-subset
    the same tables bit for bit: ``benchmarks/bench_export.py --baseline-src``).
    Row-wise products and padded element-wise ops keep a set's entries independent of what else
    shares its pass (``tests/test_estimators_covariance_coverage.py`` checks it bit for bit). The
    moments are summed over chunks of ``rows_per_chunk`` rows."""
    network.eval()
    n, m = split.quality.shape
    ids = torch.arange(2**m) if sets is None else torch.unique(torch.as_tensor(sets, dtype=torch.long))
    masks = all_masks(m)[ids]
    s_count = masks.shape[0]
    full = torch.ones(n, m, dtype=torch.bool)
    p_all, _ = split_predictions(network, split, torch.arange(n), full)
    moments = ResidualMoments(s_count, m)
    hidden = network.query_hidden(split.query_emb, split.task, split.query_feat)  # [N, H], the query branch once
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(n, start + rows_per_chunk))
        # answer projections of the chunk's rows at once (a small product's rounding depends on its size)
        prep = network.prepare_answers(split.answer_emb[rows])
        r = torch.stack([_row_residuals(network, split, int(i), masks, p_all[i], hidden[i : i + 1],
                                        {key: v[j : j + 1] for key, v in prep.items()}, sets_per_pass)
                         for j, i in enumerate(rows)])  # [k, S, M]
        moments.add(r)
    return on_all_sets(moments.covariance(), ids, m), on_all_sets(moments.second_moment(), ids, m)


def _row_residuals(network: QualityNetwork, split: "EncodedSplit", row: int, masks: Tensor, p_all: Tensor,
                   hidden: Tensor, prep: dict[str, Tensor], sets_per_pass: int) -> Tensor:
    """float64 [S, M]: ``p(all) − p(s)`` of split row ``row`` under each of ``masks`` [S, M] (``hidden``: the
    row's :meth:`~QualityNetwork.query_hidden` [1, H]; ``prep``: its
    :meth:`~QualityNetwork.prepare_answers`, [1, ...])."""
    static, pair_sim = split.static[row : row + 1], split.pair_sim[row : row + 1]
    out = []
    for lo in range(0, masks.shape[0], sets_per_pass):
        ran = masks[lo : lo + sets_per_pass]
        b = ran.shape[0]
        feat = compose_features(static.expand(b, *static.shape[1:]), pair_sim.expand(b, *pair_sim.shape[1:]), ran)
        logit = network.forward_ran_sets(hidden, ran, prep, feat)
        out.append(p_all - _sigmoid_vectorised(logit))
    return torch.cat(out).double()


def _sigmoid_vectorised(x: Tensor) -> Tensor:
    """``torch.sigmoid(x)`` with every element on torch's vectorised CPU path: a thread's tail shorter
    than two vectors takes a scalar path that can differ in the last bit, so without the zero padding
    an entry would depend on how many ran-sets share its batch."""
    flat = x.reshape(-1)
    pad = -flat.numel() % (64 * torch.get_num_threads())
    return torch.sigmoid(torch.cat([flat, flat.new_zeros(pad)]))[: flat.numel()].view_as(x)


def report_ran_sets(split: "EncodedSplit", masks_per_row: int = REPORT_MASKS_PER_ROW, seed: int = REPORT_SEED) -> Tensor:
    """Sorted long ids of the ran-sets :func:`calibration_report` reads on ``split`` (its random masks)."""
    n, m = split.quality.shape
    return torch.unique(bitmask(_report_masks(n, m, masks_per_row, seed)[1]))


def _report_masks(n: int, m: int, masks_per_row: int, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, ran): each of the ``n`` rows ``masks_per_row`` times, each with a random ran-mask."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(n).repeat(masks_per_row)
    return rows, random_ran_masks(rows.numel(), m, gen)


def _residuals(network: QualityNetwork, split: "EncodedSplit", masks_per_row: int, seed: int):
    n, m = split.quality.shape
    rows, ran = _report_masks(n, m, masks_per_row, seed)
    p_all, _ = split_predictions(network, split, torch.arange(n), torch.ones(n, m, dtype=torch.bool))
    p, logvar = split_predictions(network, split, rows, ran)
    return rows, ran, p_all[rows] - p, logvar


def fit_variance_scale(network: QualityNetwork, split: "EncodedSplit", masks_per_row: int = 8, seed: int = 0) -> Tensor:
    """[M]: ``c_m = mean(r² / exp(logvar))`` over unrun cells of random masks on ``split``."""
    _, ran, r, logvar = _residuals(network, split, masks_per_row, seed)
    ratio = r.double() ** 2 / logvar.double().exp()
    unrun = ~ran
    scale = (ratio * unrun).sum(0) / unrun.sum(0).clamp_min(1)
    return scale.clamp_min(1e-6).float()


def calibration_report(
    network: QualityNetwork,
    split: "EncodedSplit",
    var_scale: Tensor,
    covariances: Tensor | dict[str, Tensor] | None,
    masks_per_row: int = REPORT_MASKS_PER_ROW,
    seed: int = REPORT_SEED,
) -> dict[str, dict[str, float]]:
    """NLL and 90% coverage of the residual under each uncertainty method (see module docstring).
    A covariance table must hold every ran-set of :func:`report_ran_sets` (same ``masks_per_row``, ``seed``)."""
    _, ran, r, logvar = _residuals(network, split, masks_per_row, seed)
    keep = (~ran) & ~ran.all(1, keepdim=True)
    methods = {"variance_head": (var_scale * logvar.exp()).double()}
    if isinstance(covariances, Tensor):
        covariances = {"residual_covariance": covariances}
    for name, cov in (covariances or {}).items():
        methods[name] = torch.diagonal(cov[bitmask(ran)], dim1=-2, dim2=-1).double()
        if bool(torch.isnan(methods[name]).any()):
            missing = sorted({int(i) for i in bitmask(ran)[torch.isnan(methods[name]).any(1)]})
            raise ValueError(f"covariance table {name!r} lacks {len(missing)} ran-sets the report reads "
                             f"(ids {missing[:5]}...); compute it for report_ran_sets(split)")
    out = {}
    rr = r.double()[keep]
    for name, var in methods.items():
        v = var[keep].clamp_min(1e-8)
        nll = 0.5 * (torch.log(2 * math.pi * v) + rr**2 / v)
        out[name] = {
            "nll": float(nll.mean()),
            "coverage90": float((rr.abs() <= Z90 * v.sqrt()).double().mean()),
            "cells": int(rr.numel()),
        }
    return out
