"""The export picks the artifact's default uncertainty mode by calibration-split decision quality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.calibration.binding import bind_split
from cascade_routing.calibration.build import build_artifact
from cascade_routing.calibration.selection import (
    SELECTION_MODES,
    SELECTION_SCALES,
    candidate_name,
    scaled_estimator,
    select_uncertainty,
)
from cascade_routing.estimators.artifact import load_artifact
from cascade_routing.estimators.features import compose_features
from cascade_routing.estimators.network import NetworkConfig, QualityNetwork

from estimators_helpers import train_tiny


@pytest.fixture(scope="module", autouse=True)
def constant_lambda_policies():
    """Cascade routing with one λ in these tests (5x fewer λ fits; the λ shapes have their own tests)."""
    import functools

    import cascade_routing.policies.registry as registry

    with pytest.MonkeyPatch.context() as mp:  # EstimatorArtifact.policy reads registry.make_policy when called
        mp.setattr(registry, "make_policy", functools.partial(registry.make_policy, step_ratios=None))
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory, constant_lambda_policies):
    tmp = tmp_path_factory.mktemp("select")
    module, dm, _, _ = train_tiny(tmp, n=200, m=3, epochs=3)
    art = build_artifact(module, dm, strategies=("routing",), budgets_per_pair=1, progress=False)
    return art, dm, tmp


def test_selection_records_scores_and_keeps_none_unless_beaten_beyond_noise(exported):
    art, dm, tmp = exported
    sel = art.uncertainty_selection
    names = [candidate_name(m, a) for m in SELECTION_MODES for a in ((1.0,) if m == "none" else SELECTION_SCALES)]
    assert list(sel["scores"]) == names
    for mode, folds in sel["folds"].items():
        assert len(folds) == 2 and all(math.isfinite(a) for a in folds)
        assert sel["scores"][mode] == pytest.approx(np.mean(folds), abs=1e-3)
    assert set(sel["gain_lower"]) == set(names[1:])
    eligible = [n for n in names[1:] if sel["scores"][n] > sel["scores"]["none"] and sel["gain_lower"][n] > 0]
    chosen = candidate_name(sel["chosen"], sel["scale"])
    if eligible:
        best = max(sel["scores"][n] for n in eligible)
        assert chosen == next(n for n in eligible if sel["scores"][n] == best)
        assert sel["chosen_by"].startswith("paired bootstrap")
    else:
        assert chosen == "none" and sel["chosen_by"] == "default"
    assert art.uncertainty == sel["chosen"]
    n_cal = dm.splits["calibration"].quality.shape[0]
    assert sum(sel["rows"]) == n_cal  # both halves come from the calibration split
    # recorded in the saved artifact and restored on load
    loaded = load_artifact(art.save(tmp / "sel.safetensors"))
    assert loaded.uncertainty == sel["chosen"] and loaded.uncertainty_selection == sel


def test_selection_is_deterministic_and_uses_only_the_given_split(exported):
    art, dm, _ = exported
    cal = dm.splits["calibration"]
    again = select_uncertainty(art, cal, scales=SELECTION_SCALES, progress=False)
    assert again["scores"] == art.uncertainty_selection["scores"]
    # scoring a different split gives different numbers: the selection reads only what it is given
    other = select_uncertainty(art, dm.splits["val"], progress=False)
    assert sum(other["rows"]) == dm.splits["val"].quality.shape[0]
    # a mode the artifact cannot serve is skipped and listed, never silently scored
    no_cov = select_uncertainty(type(art)(**{**art.__dict__, "covariances": None}), cal, progress=False)
    assert no_cov["skipped"] == ["covariance"] and set(no_cov["scores"]) == {"variance", "none"}


def test_network_config_answer_feature_width_defaults_to_compose_features():
    cfg = NetworkConfig(num_models=5, embed_dim=8)
    assert cfg.num_answer_features == 4 + 5
    assert NetworkConfig(**cfg.to_dict()) == cfg  # round trip through the stored dict
    assert NetworkConfig(num_models=5, embed_dim=8, num_answer_features=7).num_answer_features == 7
    net = QualityNetwork(NetworkConfig(num_models=3, embed_dim=8, hidden=16)).eval()
    b, m = 2, 3
    ran = torch.tensor([[True, False, True], [False, False, False]])
    feat = compose_features(torch.rand(b, m, 3), torch.rand(b, m, m), ran)
    logit, logvar = net(torch.randn(b, 8), ran, torch.randn(b, m, 8), feat)
    assert logit.shape == logvar.shape == (b, m)


@pytest.mark.parametrize("winner", ["variance", "covariance", "none"])
def test_selection_follows_the_fold_scores(exported, monkeypatch, winner):
    """With the sweep's AUC (and per-query quality) forced per mode, the recorded scores are those AUCs
    and the best candidate that clearly beats ``none`` wins (``none`` itself when it is best)."""
    import cascade_routing.calibration.selection as sweep  # the sweep as the selection calls it

    art, dm, _ = exported
    real = sweep.budget_sweep
    fake_auc = {"variance": 50.0, "covariance": 40.0, "none": 30.0, winner: 90.0}
    calls = []

    def forced(policy, qe, *args, **kwargs):
        res = real(policy, qe, *args, **kwargs)
        calls.append((qe.uncertainty, kwargs.get("num_resamples")))
        res.auc = fake_auc[qe.uncertainty] + (1.0 if len(calls) % 2 else 0.0)  # folds differ: mean is scored
        res.per_query_quality = res.per_query_quality + fake_auc[qe.uncertainty] / 100  # the bootstrap sees it
        return res

    monkeypatch.setattr(sweep, "budget_sweep", forced)
    sel = select_uncertainty(art, dm.splits["calibration"], progress=False)
    assert sel["chosen"] == winner
    assert sel["scores"] == {m: fake_auc[m] + 0.5 for m in SELECTION_MODES}
    assert sorted(calls) == sorted((m, 1) for m in SELECTION_MODES for _ in range(2))  # 2 folds, no bootstrap


@pytest.mark.parametrize("low", [b"\x80\x01", b"PK"])
def test_safetensors_header_length_that_looks_like_pickle_or_zip_is_not_refused(tmp_path, low):
    """A header length whose low bytes read 0x80.. / 'PK' must not be mistaken for a pickle / zip."""
    import pickle

    from cascade_routing.estimators.artifact import _sniff

    n = int.from_bytes(low + b"\x00" * (8 - len(low)), "little")
    path = tmp_path / "x.safetensors"
    path.write_bytes(n.to_bytes(8, "little") + b"{" + b" " * (n - 2) + b"}")
    assert _sniff(path) is None
    pk = tmp_path / "p.bin"
    pk.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert "pickle" in _sniff(pk)


def test_scaled_candidates_shrink_the_uncertainty_and_the_winner_is_stored(exported, monkeypatch):
    """α·Σ / α·σ² as the formula says; a forced winner "covariance*0.3" is folded into the stored table."""
    import cascade_routing.calibration.selection as sweep  # the sweep as the selection calls it
    import torch

    art, dm, tmp = exported
    cal = dm.splits["calibration"]
    base, _ = bind_split(art, cal, uncertainty="none")
    rows = torch.arange(6)
    ran = torch.zeros(6, 3, dtype=torch.bool)
    ran[::2, 0] = True
    var1 = scaled_estimator(base, "variance", 1.0).estimate(rows, ran).std ** 2
    var3 = scaled_estimator(base, "variance", 0.3).estimate(rows, ran).std ** 2
    assert torch.allclose(var3, 0.3 * var1, rtol=1e-5)
    eye = 1e-6 * torch.eye(3)
    cov1 = scaled_estimator(base, "covariance", 1.0).estimate(rows, ran).cov - eye
    cov3 = scaled_estimator(base, "covariance", 0.3).estimate(rows, ran).cov - eye
    assert torch.allclose(cov3, 0.3 * cov1, atol=1e-7)
    assert base.uncertainty == "none" and base.covariances is art.covariances  # the base is untouched

    real = sweep.budget_sweep
    seen = []

    def forced(policy, qe, *args, **kwargs):
        res = real(policy, qe, *args, **kwargs)
        key = (qe.uncertainty, float(qe.var_scale.sum()), None if qe.covariances is None else float(qe.covariances.sum()))
        seen.append(key)
        cov_ratio = None if qe.covariances is None or art.covariances is None else float(
            qe.covariances.sum() / art.covariances.sum())
        res.auc = 90.0 if qe.uncertainty == "covariance" and cov_ratio == pytest.approx(0.3) else 10.0
        res.per_query_quality = res.per_query_quality + res.auc / 100
        return res

    monkeypatch.setattr(sweep, "budget_sweep", forced)
    sel = select_uncertainty(art, cal, scales=(1.0, 0.3), progress=False)
    assert (sel["chosen"], sel["scale"]) == ("covariance", 0.3)
    assert set(sel["scores"]) == {"none", "variance", "variance*0.3", "covariance", "covariance*0.3"}
    monkeypatch.setattr(sweep, "budget_sweep", real)
    import cascade_routing.calibration.build as build

    monkeypatch.setattr(build, "select_uncertainty", lambda *a, **k: sel)
    module, dm2, _, _ = train_tiny(tmp / "again", n=200, m=3, epochs=1)
    plain = build_artifact(module, dm2, fit_lambdas=False, select_modes=None, progress=False)
    shrunk = build_artifact(module, dm2, fit_lambdas=False, progress=False)
    assert shrunk.uncertainty == "covariance"
    assert torch.allclose(shrunk.covariances, 0.3 * plain.covariances)
    assert torch.equal(shrunk.var_scale, plain.var_scale)
    loaded = load_artifact(shrunk.save(tmp / "shrunk.safetensors"))
    assert torch.allclose(loaded.covariances, shrunk.covariances) and loaded.uncertainty_selection["scale"] == 0.3
