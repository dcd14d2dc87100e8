"""A residual covariance table restricted to the ran-sets the policies can read (``covariance_coverage``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cascade_routing.calibration.binding import bind_split
from cascade_routing.calibration.build import build_artifact
from cascade_routing.calibration.uncertainty import calibration_report, report_ran_sets
from cascade_routing.estimators.artifact import ArtifactError, load_artifact
from cascade_routing.estimators.learned import UncoveredRanSetError
from cascade_routing.estimators.masks import all_masks, bitmask, covered_ran_sets
from cascade_routing.evaluation import simulate
from cascade_routing.policies.registry import make_policy

from estimators_helpers import train_tiny

M, MAX_RUN = 4, 2


def test_covered_ran_sets_are_the_small_sets_plus_chain_prefixes():
    small = covered_ran_sets(5, 2)
    assert small.tolist() == sorted(s for s in range(32) if bin(s).count("1") <= 2)
    with_chains = covered_ran_sets(5, 2, chains=[range(5), [0, 2, 4]])
    extra = sorted(set(with_chains.tolist()) - set(small.tolist()))
    assert extra == [0b00111, 0b01111, 0b10101, 0b11111]
    assert covered_ran_sets(5, None).tolist() == list(range(32))
    with pytest.raises(ValueError, match="names model index 7"):
        covered_ran_sets(5, 2, chains=[[0, 7]])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same trained network exported with the full table and with the restricted one."""
    tmp = tmp_path_factory.mktemp("coverage")
    module, dm, _, _ = train_tiny(tmp, n=200, m=M, epochs=2)
    kwargs = dict(fit_lambdas=False, select_modes=None, progress=False)
    full = build_artifact(module, dm, covariance_max_run=None, **kwargs)
    restricted = build_artifact(module, dm, covariance_max_run=MAX_RUN, **kwargs)
    return full, restricted, dm, tmp, module.network


def _held(art) -> torch.Tensor:
    return ~torch.isnan(art.covariances).flatten(1).any(1)


def test_restricted_table_equals_the_full_one_on_every_covered_set(exports):
    full, restricted, dm, _, network = exports
    assert full.covariance_coverage is None and bool(_held(full).all())
    cov = restricted.covariance_coverage
    assert cov["max_run"] == MAX_RUN and cov["chains"][0] == list(restricted.models)
    held = _held(restricted)
    expected = torch.zeros(2**M, dtype=torch.bool)
    expected[covered_ran_sets(M, MAX_RUN, [range(M), [restricted.models.index(n) for n in cov["chains"][1]]])] = True
    assert torch.equal(held, expected) and not bool(held.all())
    assert torch.equal(restricted.covariances[held], full.covariances[held])  # bit for bit
    # the report read its own sets (computed, then dropped when not covered): the same report and choice
    assert restricted.calibration == full.calibration
    assert restricted.covariance_kind == full.covariance_kind
    missing = sorted(set(report_ran_sets(dm.splits["val"]).tolist()) - set(np.nonzero(held.numpy())[0].tolist()))
    if missing:  # a table without the report's sets is refused by the report, not read as NaN
        with pytest.raises(ValueError, match="lacks"):
            calibration_report(network, dm.splits["val"], torch.ones(M), restricted.covariances)


def test_restricted_table_serves_the_same_estimates_for_covered_sets(exports):
    full, restricted, dm, _, _ = exports
    cal = dm.splits["calibration"]
    qe_full, _ = bind_split(full, cal, uncertainty="covariance")
    qe_res, _ = bind_split(restricted, cal, uncertainty="covariance")
    n = cal.dataset.quality.shape[0]
    for state in covered_ran_sets(M, MAX_RUN, [range(M)]).tolist():
        ran = all_masks(M)[state].expand(n, M)
        a, b = qe_full.estimate(torch.arange(n), ran), qe_res.estimate(torch.arange(n), ran)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)


def test_policies_within_the_coverage_decide_the_same_without_an_uncovered_lookup(exports):
    full, restricted, dm, _, _ = exports
    cal = dm.splits["calibration"]
    ds = cal.dataset
    for policy in (make_policy("cascade_routing", num_samples=16, max_depth=MAX_RUN, step_ratios=None),
                   make_policy("threshold_cascade"), make_policy("optimal_cascade", num_samples=16)):
        runs = []
        for art in (full, restricted):
            qe, ce = bind_split(art, cal, uncertainty="covariance")
            lam = 0.5 if policy.name == "threshold_cascade" else 1e3 * float(np.median(ds.cost))
            runs.append(simulate(policy, qe, ce, ds.quality, ds.cost, lam))
        assert torch.equal(runs[0].ran, runs[1].ran) and torch.equal(runs[0].answer, runs[1].answer)


def test_uncovered_lookup_fails_naming_the_ran_set_and_the_depth(exports):
    _, restricted, dm, _, _ = exports
    qe, _ = bind_split(restricted, dm.splits["calibration"], uncertainty="covariance")
    ran = torch.tensor([[True, False, True, True]])  # 3 models run, not a prefix of the cost order
    assert int(bitmask(ran)) not in covered_ran_sets(M, MAX_RUN, [range(M)]).tolist()
    names = [restricted.models[j] for j in (0, 2, 3)]
    if names == restricted.covariance_coverage["chains"][1][:3]:
        pytest.skip("this set is the pool chain's prefix here")
    with pytest.raises(UncoveredRanSetError, match=rf"{names[0]}.*3 models run.*at most {MAX_RUN} models"):
        qe.estimate(torch.tensor([0]), ran)
    qe_none, _ = bind_split(restricted, dm.splits["calibration"], uncertainty="variance")
    assert qe_none.estimate(torch.tensor([0]), ran).std is not None  # other modes are not limited


def test_restricted_table_round_trips_compactly(exports):
    _, restricted, _, tmp, _ = exports
    path = restricted.save(tmp / "restricted.safetensors")
    from safetensors.torch import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.get_tensor("covariances").shape[0] == int(_held(restricted).sum()) < 2**M
    loaded = load_artifact(path)
    assert loaded.covariance_coverage == restricted.covariance_coverage
    held = _held(restricted)
    assert torch.equal(_held(loaded), held) and torch.equal(loaded.covariances[held], restricted.covariances[held])


def test_restricted_table_with_the_wrong_row_count_is_refused(exports):
    _, restricted, _, tmp, _ = exports
    path = restricted.save(tmp / "restricted.safetensors")
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["covariances"] = tensors["covariances"][1:].contiguous()
    save_file(tensors, str(tmp / "short.safetensors"), metadata=meta)
    with pytest.raises(ArtifactError, match=r"covariances have shape .*max_run"):
        load_artifact(tmp / "short.safetensors")


def test_full_table_artifacts_written_before_coverage_existed_still_load_and_serve(exports):
    full, _, dm, tmp, _ = exports
    path = full.save(tmp / "full.safetensors")
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    payload = json.loads(meta["payload"])
    del payload["covariance_coverage"]  # the payload of an artifact from before the field existed
    assert tensors["covariances"].shape == (2**M, M, M)
    save_file(tensors, str(tmp / "old.safetensors"), metadata={**meta, "payload": json.dumps(payload)})
    old = load_artifact(tmp / "old.safetensors")
    assert old.covariance_coverage is None and torch.equal(old.covariances, full.covariances)
    qe, _ = bind_split(old, dm.splits["calibration"], uncertainty="covariance")
    ran = torch.ones(1, M, dtype=torch.bool)  # any ran-set, e.g. all models run
    assert torch.equal(qe.estimate(torch.tensor([0]), ran).cov[0], full.covariances[2**M - 1] + 1e-6 * torch.eye(M))


def test_residual_moments_match_a_direct_computation_for_any_subset_of_sets(exports):
    from cascade_routing.calibration.uncertainty import residual_moments, split_predictions

    *_, dm, _, network = exports
    cal = dm.splits["calibration"]
    n = cal.quality.shape[0]
    cov, second = residual_moments(network, cal, rows_per_chunk=3, sets_per_pass=5)
    p_all, _ = split_predictions(network, cal, torch.arange(n), torch.ones(n, M, dtype=torch.bool))
    for state in range(2**M):
        p, _ = split_predictions(network, cal, torch.arange(n), all_masks(M)[state].expand(n, M))
        r = (p_all - p).double()
        torch.testing.assert_close(cov[state], torch.cov(r.T).float(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(second[state], (r.T @ r / n).float(), rtol=1e-4, atol=1e-7)
    sub = torch.tensor([0, 5, 9, 15])
    cov_sub, second_sub = residual_moments(network, cal, rows_per_chunk=3, sets=sub, sets_per_pass=3)
    # other passes batch the sets differently: the same numbers up to float32 rounding of the forward pass
    torch.testing.assert_close(cov_sub[sub], cov[sub], rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(second_sub[sub], second[sub], rtol=1e-5, atol=1e-10)
    others = torch.ones(2**M, dtype=torch.bool)
    others[sub] = False
    assert bool(torch.isnan(cov_sub[others]).all()) and bool(torch.isnan(second_sub[others]).all())


def test_residual_moments_accumulator_is_the_covariance_and_second_moment_over_rows():
    from cascade_routing.estimators.residuals import ResidualMoments

    r = torch.randn(37, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    acc = ResidualMoments(5, 3)
    with pytest.raises(ValueError, match="no residual rows"):
        acc.covariance()
    for lo in range(0, 37, 8):  # chunks of rows, the last one short
        acc.add(r[lo : lo + 8])
    for s in range(5):
        torch.testing.assert_close(acc.covariance()[s], torch.cov(r[:, s].T).float())
        torch.testing.assert_close(acc.second_moment()[s], (r[:, s].T @ r[:, s] / 37).float())
