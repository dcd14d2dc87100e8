"""Neighbour prior and query text statistics: what the ex-ante query branch sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.estimators.features import TEXT_STATISTICS, text_statistics
from cascade_routing.estimators.neighbours import neighbour_prior
from cascade_routing.estimators.network import NetworkConfig, QualityNetwork


def _memory(n: int = 40, d: int = 6, m: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = (torch.rand(n, m, generator=g) > 0.5).float()
    return keys, labels


def test_prior_is_the_mean_quality_of_the_k_most_similar_queries():
    keys, labels = _memory()
    q = torch.randn(5, keys.shape[1])
    prior = neighbour_prior(q, keys, labels, k=4)
    sim = torch.nn.functional.normalize(q, dim=-1) @ keys.T
    for b in range(5):
        idx = sim[b].argsort(descending=True)[:4]
        torch.testing.assert_close(prior[b, :3], labels[idx].mean(0))
        torch.testing.assert_close(prior[b, 3], labels[idx].mean())


def test_a_training_query_never_sees_its_own_label():
    keys, labels = _memory()
    q = keys[:10] * 3.0  # the training queries themselves (scale does not matter: cosine)
    before = neighbour_prior(q, keys, labels, k=5)
    flipped = labels.clone()
    flipped[:10] = 1.0 - flipped[:10]
    after = neighbour_prior(q, keys, flipped, k=5)
    for b in range(10):  # flipping only row b's own label leaves row b's prior unchanged
        own_only = labels.clone()
        own_only[b] = 1.0 - own_only[b]
        torch.testing.assert_close(neighbour_prior(q[b : b + 1], keys, own_only, k=5), before[b : b + 1])
    assert not torch.equal(before, after)  # flipping the neighbours' labels does move the prior


def test_prior_needs_more_memory_than_k():
    keys, labels = _memory(n=4)
    with pytest.raises(ValueError, match="more than k=4"):
        neighbour_prior(torch.randn(2, keys.shape[1]), keys, labels, k=4)


def test_text_statistics_count_what_they_say():
    stats = text_statistics(["", "two words", "a\nb\nc 12 345"])
    assert stats.shape == (3, len(TEXT_STATISTICS))
    np.testing.assert_allclose(stats[0], 0.0)
    np.testing.assert_allclose(stats[1], [np.log1p(9) / 8, np.log1p(2) / 6, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(stats[2, 2:], [np.log1p(2) / 4, np.log1p(5) / 4], rtol=1e-6)


def test_network_memory_drives_the_ex_ante_estimate_and_round_trips():
    keys, labels = _memory(n=30, d=8, m=3)
    cfg = NetworkConfig(num_models=3, embed_dim=8, hidden=16, dropout=0.0, neighbours=5, memory_size=30,
                        num_query_features=len(TEXT_STATISTICS), query_embedding_input=False)
    net = QualityNetwork(cfg).eval()
    net.set_memory(keys, labels)
    b = 4
    args = (torch.randn(b, 8), torch.zeros(b, 3, dtype=torch.bool), torch.zeros(b, 3, 8), torch.zeros(b, 3, 7))
    qf = torch.rand(b, len(TEXT_STATISTICS))
    before = net(*args, None, qf)[0]
    net2 = QualityNetwork(NetworkConfig(**cfg.to_dict())).eval()
    net2.load_state_dict(net.state_dict(), strict=True)  # memory is part of the weights
    torch.testing.assert_close(net2(*args, None, qf)[0], before)
    net.set_memory(keys, 1.0 - labels)
    assert not torch.allclose(net(*args, None, qf)[0], before)
    with pytest.raises(ValueError, match="memory must be"):
        net.set_memory(keys[:10], labels[:10])


def test_old_network_configs_build_without_the_new_inputs():
    cfg = NetworkConfig(num_models=2, embed_dim=4)  # as stored by artifacts written before the prior
    net = QualityNetwork(cfg)
    assert not hasattr(net, "memory_keys")
    assert net.query_mlp[0].in_features == 4


def test_repeated_queries_get_the_prior_of_their_single_search():
    keys, labels = _memory()
    q = torch.randn(6, keys.shape[1])
    repeated = q.repeat_interleave(4, dim=0)[torch.randperm(24, generator=torch.Generator().manual_seed(1))]
    single = torch.cat([neighbour_prior(q[b : b + 1], keys, labels, k=5) for b in range(6)])
    expected = single[[int(torch.nonzero((q == row).all(1))[0]) for row in repeated]]
    torch.testing.assert_close(neighbour_prior(repeated, keys, labels, k=5), expected)


def test_runs_of_repeated_queries_get_the_prior_of_their_single_search():
    # the layout of residual covariances: each query repeated once per ran-set, in runs; plus a later repeat
    keys, labels = _memory()
    q = torch.randn(5, keys.shape[1])
    layout = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 0, 0, 1])
    single = torch.cat([neighbour_prior(q[b : b + 1], keys, labels, k=5) for b in range(5)])
    assert torch.equal(neighbour_prior(q[layout], keys, labels, k=5), single[layout])
