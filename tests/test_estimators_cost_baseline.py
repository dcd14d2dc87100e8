"""Cost model (prices × tokens, mean fallback, exact once run) and the paper-style baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.estimators.agreement import masked_agreement
from cascade_routing.estimators.baseline import BaselineModel, design_all_masks, fit_logistic
from cascade_routing.estimators.masks import all_masks
from cascade_routing.estimators.cost import BoundCostEstimator, CostModel

from estimators_helpers import make_synthetic_dataset


def test_cost_model_recovers_prices_and_is_exact_once_run():
    ds = make_synthetic_dataset(200, 3)
    price_in, price_out = np.array([1e-6, 3e-6, 1e-5]), np.array([2e-6, 6e-6, 3e-5])
    ds.cost = ds.features["tokens_in"] * price_in + ds.features["tokens_out"] * price_out
    model = CostModel.fit(ds)
    assert model.mode == "tokens"
    np.testing.assert_allclose(model.price_in, price_in, rtol=1e-6)
    np.testing.assert_allclose(model.price_out, price_out, rtol=1e-6)
    feats = {k: v.copy() for k, v in ds.features.items()}
    est = BoundCostEstimator(model, ds.queries, feats, ds.tasks)
    ran = torch.zeros(200, 3, dtype=torch.bool)
    ran[:, 1] = True
    c = est.estimate(torch.arange(200), ran).double().numpy()
    np.testing.assert_allclose(c[:, 1], ds.cost[:, 1], rtol=1e-5)  # exact where ran (tokens × prices)
    assert (c[:, 0] > 0).all() and not np.allclose(c[:, 0], ds.cost[:, 0])  # predicted elsewhere
    feats["tokens_out"][:, 0] = 1e9  # an unrun model's recorded tokens are never read
    np.testing.assert_array_equal(est.estimate(torch.arange(200), ran).numpy(), c.astype(np.float32))


def test_cost_model_mean_mode_without_tokens():
    ds = make_synthetic_dataset(120, 2)
    ds.features = {}
    model = CostModel.fit(ds)
    assert model.mode == "mean"
    pred = model.predict(ds.queries, ds.tasks)
    tasks = np.asarray(ds.tasks)
    for t in set(ds.tasks):
        np.testing.assert_allclose(pred[tasks == t][0], ds.cost[tasks == t].mean(0))
    np.testing.assert_allclose(model.predict(["x"], ["unseen-task"])[0], ds.cost.mean(0))
    model2 = CostModel.from_dict(model.to_dict())
    np.testing.assert_array_equal(model2.predict(ds.queries, ds.tasks), pred)


def test_design_all_masks_agreement_is_the_masked_agreement_rule():
    gen = torch.Generator().manual_seed(0)
    n, m, tasks = 7, 4, 2
    pair = torch.rand(n, m, m, generator=gen, dtype=torch.float64)
    pair = (pair + pair.transpose(1, 2)) / 2 * (1 - torch.eye(m, dtype=torch.float64))  # zero diagonal
    static = torch.rand(n, m, 4, generator=gen, dtype=torch.float64)
    task = torch.eye(tasks, dtype=torch.float64)[torch.randint(0, tasks, (n,), generator=gen)]
    masks = all_masks(m)
    x = design_all_masks(task, static, pair, masks)  # [S, N, T + 3M + 1]
    assert x.shape == (masks.shape[0], n, tasks + 3 * m + 1)
    for s, mask in enumerate(masks):
        _, want = masked_agreement(pair, mask.expand(n, m), torch.float64)
        torch.testing.assert_close(x[s, :, tasks + 2: tasks + 3 * m: 3], want, rtol=0, atol=1e-12)
        assert bool((x[s, :, tasks: tasks + 3 * m].reshape(n, m, 3)[:, ~mask] == 0).all())  # unrun: zeros


def test_logistic_fit_matches_lbfgs():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 300, 4), torch.ones(2, 300, 1)], -1)
    y = (torch.rand(300, 2) < 0.4).double()
    w = fit_logistic(x, y, alpha=1.0, iterations=300)
    reg = torch.ones(5, dtype=torch.float64)
    reg[-1] = 1e-6
    for s in range(2):
        for j in range(2):
            v = torch.zeros(5, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(x[s].double() @ v, y[:, j], reduction="sum")
                loss = loss + 0.5 * (reg * v * v).sum()
                loss.backward()
                return loss

            opt.step(closure)
            torch.testing.assert_close(w[s, j].double(), v.detach(), atol=1e-4, rtol=1e-4)


def test_baseline_learns_and_never_reads_unrun_answers():
    train = make_synthetic_dataset(300, 3, seed=1)
    cal = make_synthetic_dataset(120, 3, seed=2)
    test = make_synthetic_dataset(120, 3, seed=3)
    model = BaselineModel.fit(train)
    model.fit_covariances(cal)
    assert model.covariances.shape == (8, 3, 3)
    qe = model.bind(test.queries, test.responses, test.features, test.tasks)
    rows = torch.arange(120)
    ran = torch.zeros(120, 3, dtype=torch.bool)
    ran[:, 0] = True
    est = qe.estimate(rows, ran)
    assert est.cov is not None and est.cov.shape == (120, 3, 3)
    y = test.quality[:, 0]
    p = est.mean[:, 0].numpy()
    assert p[y == 1].mean() > p[y == 0].mean() + 0.3  # post-hoc (confidence) separates right from wrong
    resp = test.responses.copy()
    feats = {k: v.copy() for k, v in test.features.items()}
    resp[:, 1:] = "answer yes alpha"
    for v in feats.values():
        v[:, 1:] = 0.99
    qe2 = model.bind(test.queries, resp, feats, test.tasks)
    assert torch.equal(qe2.estimate(rows, ran).mean, est.mean)


def test_nonneg_price_fit_on_the_boundary():
    """When the unconstrained least squares wants a negative price, the fit is the best non-negative
    one (the edge with that price at 0), not the clamped unconstrained solution."""
    from cascade_routing.data.prices import nonneg_lstsq

    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(1, 10, 50), rng.uniform(1, 10, 50)
    y = 2.0 * x1 - 0.5 * x2
    a, b = nonneg_lstsq(x1, x2, y)
    assert b == 0.0 and a == pytest.approx(float(x1 @ y / (x1 @ x1)))
    assert nonneg_lstsq(x1, x2, 3.0 * x1 + 0.25 * x2) == pytest.approx((3.0, 0.25))


def test_the_baseline_refuses_more_models_than_it_can_fit_and_says_how_to_go_on():
    """2^M regressions: with 20 models train-eval ran for hours; above MAX_BASELINE_MODELS the fit is
    refused at once, naming the way to evaluate without it."""
    from cascade_routing.estimators.baseline import MAX_BASELINE_MODELS

    ds = make_synthetic_dataset(n=20, m=MAX_BASELINE_MODELS + 1)
    with pytest.raises(ValueError, match=rf"2\^{MAX_BASELINE_MODELS + 1} = 32,768 .*at most {MAX_BASELINE_MODELS} "
                                         r"models.*--no-baseline"):
        BaselineModel.fit(ds)
