"""No-leakage guarantees and consistency of the quality network and the bound estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.estimators.features import ANSWER_FEATURES, answer_features, compose_features, encode_confidence
from cascade_routing.estimators.masks import all_masks, bitmask
from cascade_routing.estimators.network import NetworkConfig, QualityNetwork


ENCODINGS = ("logprob", "logprob_and_surprise")


def _net(m: int = 4, d: int = 16, t: int = 3, confidence_encoding: str = "logprob") -> QualityNetwork:
    torch.manual_seed(0)
    net = QualityNetwork(NetworkConfig(num_models=m, embed_dim=d, num_tasks=t, hidden=24, dropout=0.0, num_answer_features=4 + m,
                                       confidence_encoding=confidence_encoding))
    # make every parameter non-trivial so a leak could not hide behind zero-initialised weights
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _inputs(b: int = 5, m: int = 4, d: int = 16, t: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.rand(b, m, 4 + m, generator=g)
    feat[..., 1] = -(10.0 ** (9 * torch.rand(b, m, generator=g) - 8))  # log-probs from −1e-8 to −10
    return (torch.randn(b, d, generator=g), torch.randn(b, m, d, generator=g), feat,
            torch.eye(t)[torch.randint(0, t, (b,), generator=g)])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_unrun_answers_never_change_any_output(encoding):
    net = _net(confidence_encoding=encoding)
    q, a, f, task = _inputs()
    for ran in all_masks(4):
        ran_b = ran.expand(5, 4).clone()
        base = net(q, ran_b, a, f, task)
        unrun = ~ran_b
        for garbage in (100.0, float("inf"), float("nan")):  # NaN/inf in an unrun cell must not propagate
            a2, f2 = a.clone(), f.clone()
            a2[unrun] = torch.randn_like(a2[unrun]) * garbage
            f2[unrun] = garbage
            out = net(q, ran_b, a2, f2, task)
            for x, y in zip(base, out):
                assert torch.equal(x, y), f"leak for ran-set {ran.tolist()} with {garbage}"
                assert torch.isfinite(y).all()


def test_run_answers_do_change_estimates():
    net = _net()
    q, a, f, task = _inputs()
    ran = torch.zeros(5, 4, dtype=torch.bool)
    ran[:, 1] = True
    base = net(q, ran, a, f, task)[0]
    a2 = a.clone()
    a2[:, 1] += 3.0
    assert not torch.allclose(base, net(q, ran, a2, f, task)[0])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_prepared_path_equals_forward(encoding):
    net = _net(confidence_encoding=encoding)
    q, a, f, task = _inputs()
    for ran in all_masks(4):
        ran_b = ran.expand(5, 4)
        x = net(q, ran_b, a, f, task)
        y = net.forward_prepared(q, ran_b, net.prepare_answers(a), f, task)
        torch.testing.assert_close(x[0], y[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x[1], y[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_ran_sets_path_equals_forward_prepared_for_every_mask(encoding):
    m, d = 4, 16
    torch.manual_seed(0)
    net = QualityNetwork(NetworkConfig(num_models=m, embed_dim=d, num_tasks=3, hidden=24, dropout=0.0,
                                       num_answer_features=4 + m, num_query_features=2, neighbours=2, memory_size=6,
                                       confidence_encoding=encoding))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.set_memory(torch.randn(6, d), torch.rand(6, m))
    net.eval()
    q, a, f, task = _inputs(b=1, m=m, d=d)
    qf = torch.randn(1, 2)
    masks = all_masks(m)
    s = masks.shape[0]
    feat = f.expand(s, -1, -1).clone()
    feat[~masks] = float("nan")  # unrun cells must not be read
    prep = net.prepare_answers(a)
    with torch.no_grad():
        want, _ = net.forward_prepared(q.expand(s, -1), masks, {k: v.expand(s, *v.shape[1:]) for k, v in prep.items()},
                                       feat, task.expand(s, -1), qf.expand(s, -1))
        got = net.forward_ran_sets(net.query_hidden(q, task, qf), masks, prep, feat)
    assert got.shape == (s, m) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[-1])  # the masks matter


def test_compose_features_masks_and_agreement():
    static = torch.rand(1, 3, 3) + 1
    pair = torch.tensor([[[0.0, 0.5, 1.0], [0.5, 0.0, 0.2], [1.0, 0.2, 0.0]]])
    ran = torch.tensor([[True, True, False]])
    out = compose_features(static, pair, ran)
    assert torch.equal(out[0, 2], torch.zeros(7))
    assert torch.equal(out[0, 0, 4:], torch.tensor([0.0, 0.5, 0.0]))
    assert out[0, 0, 3] == pytest.approx(0.5) and out[0, 1, 3] == pytest.approx(0.5)
    ran_all = torch.ones(1, 3, dtype=torch.bool)
    assert compose_features(static, pair, ran_all)[0, 0, 3] == pytest.approx(0.75)


def test_answer_features_read_only_run_cells():
    responses = np.array([["a b", "a c", "zzz"]], dtype=object)
    conf = np.array([[0.9, 0.1, 0.5]])
    ran = np.array([[True, True, False]])
    out = answer_features(np.array([0]), ran, responses, {"logprob_confidence": conf})
    responses2 = responses.copy()
    responses2[0, 2] = None
    conf2 = conf.copy()
    conf2[0, 2] = 123.0
    out2 = answer_features(np.array([0]), ran, responses2, {"logprob_confidence": conf2})
    assert np.array_equal(out, out2)
    assert out[0, 0, 1] == pytest.approx(0.9) and out[0, 0, 3] == pytest.approx(1 / 3)


def test_log_surprise_spreads_the_log_probs_of_confident_answers():
    conf = torch.tensor([0.0, -1e-9, -1e-7, -1e-5, -1e-2, -1.0, -30.0, 0.0])
    feat = torch.rand(8, len(ANSWER_FEATURES) + 3)
    feat[:, ANSWER_FEATURES.index("confidence")] = conf
    feat[:, ANSWER_FEATURES.index("has_confidence")] = torch.tensor([1.0] * 7 + [0.0])  # the last cell has none
    out = encode_confidence(feat, "logprob_and_surprise")
    assert out.shape == (8, feat.shape[1] + 1) and torch.equal(out[:, :-1], feat)  # appended, nothing replaced
    surprise = out[:, -1]
    torch.testing.assert_close(surprise[[0, 3, 5]], torch.tensor([1.0, 5 / 9, 0.0]), atol=1e-4, rtol=0)
    assert bool((surprise[:7].diff() < 0).all())  # more surprise, lower value
    # −1e-7 and −1e-2 are 0.56 apart as log surprise (1e-2 apart as log-probs)
    assert float(surprise[2] - surprise[4]) > 0.5
    assert surprise[7] == 0.0 and float(surprise[6]) == pytest.approx(-np.log10(30.0) / 9, abs=1e-6)
    assert torch.equal(encode_confidence(feat, "logprob"), feat)
    with pytest.raises(ValueError, match="confidence encoding"):
        encode_confidence(feat, "probability")


def test_network_config_confidence_encoding_defaults_to_the_raw_log_prob_of_older_networks():
    assert NetworkConfig(num_models=2, embed_dim=4).confidence_encoding == "logprob"
    assert QualityNetwork(NetworkConfig(num_models=2, embed_dim=4)).answer_feat_proj.in_features == 4 + 2 + 1 + 2
    stored = NetworkConfig(num_models=2, embed_dim=4, confidence_encoding="logprob_and_surprise").to_dict()
    assert NetworkConfig(**stored).confidence_encoding == "logprob_and_surprise"
    assert QualityNetwork(NetworkConfig(**stored)).answer_feat_proj.in_features == 4 + 2 + 1 + 2 + 1
    with pytest.raises(ValueError, match="confidence_encoding"):
        NetworkConfig(num_models=2, embed_dim=4, confidence_encoding="prob")


def test_the_log_surprise_lets_the_network_tell_confident_answers_apart():
    """Same weights, the log surprise's input weights zeroed: its inputs alone make −1e-7 and −1e-3 differ."""
    torch.manual_seed(0)
    net = _net(confidence_encoding="logprob_and_surprise")
    q, a, f, task = _inputs(b=2)
    ran = torch.ones(2, 4, dtype=torch.bool)
    f[:, :, ANSWER_FEATURES.index("has_confidence")] = 1.0
    f = f[:1].repeat(2, 1, 1)  # two copies of one query's answers that differ only in their log-probs
    f[0, :, 1], f[1, :, 1] = -1e-7, -1e-3
    q, a, task = q[:1].expand(2, -1), a[:1].expand(2, -1, -1), task[:1].expand(2, -1)

    def gap() -> float:
        with torch.no_grad():
            logit = net(q, ran, a, f, task)[0]
        return float((logit[0] - logit[1]).abs().max())

    with_surprise = gap()
    with torch.no_grad():
        net.answer_feat_proj.weight[:, net.config.num_answer_features] = 0.0  # the appended column: after F, before s, C
    assert with_surprise > 50 * gap(), (with_surprise, gap())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_surprise_network_on_cuda_matches_cpu():
    net = _net(confidence_encoding="logprob_and_surprise")
    q, a, f, task = _inputs()
    ran = torch.ones(5, 4, dtype=torch.bool)
    ran[:, 2] = False
    with torch.no_grad():
        want = net(q, ran, a, f, task)
        got = net.cuda()(q.cuda(), ran.cuda(), a.cuda(), f.cuda(), task.cuda())
    for x, y in zip(want, got):
        torch.testing.assert_close(y.cpu(), x, atol=1e-5, rtol=1e-5)


def test_bitmask_matches_enumeration():
    masks = all_masks(5)
    assert torch.equal(bitmask(masks), torch.arange(32))


def test_loading_an_encoder_prints_no_progress_bar_and_restores_the_setting(tmp_path, capfd):
    """transformers draws a "Loading weights" bar on stderr for every from_pretrained; an artifact
    load (a server start, every CLI command) should not, and the user's own setting is kept."""
    from transformers.utils import logging as hf_logging

    from estimators_helpers import make_tiny_encoder
    from cascade_routing.estimators.encoding import load_encoder_model

    folder = make_tiny_encoder(tmp_path / "enc")
    capfd.readouterr()
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        try:
            model = load_encoder_model(str(folder))
            assert hf_logging.is_progress_bar_enabled() is enabled
        finally:
            hf_logging.enable_progress_bar()
        assert model.config.hidden_size == 32
    assert "Loading weights" not in capfd.readouterr().err
