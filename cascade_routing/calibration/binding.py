"""Bind an artifact to an encoded data split through the split's cached embeddings (no encoder run).

Calibration, λ fitting and held-out evaluation all score the artifact this way: the answer texts of
the split are looked up in its cached answer embeddings (:func:`split_embedding_lookup`), and a
fine-tuned query encoder first re-encodes the split's queries (:func:`refresh_query_embeddings`).
A *split* is any object with ``dataset`` (a :class:`~cascade_routing.data.RoutingDataset`),
``query_emb`` [N, D] and ``answer_emb`` [N, M, D] tensors (the training data module's ``EncodedSplit``).
"""

from __future__ import annotations

import numpy as np
import torch

from cascade_routing.estimators import encoding
from cascade_routing.estimators.artifact import EstimatorArtifact


def split_embedding_lookup(split) -> "callable":
    """An ``answer_embedder`` that serves cached embeddings of this split's responses by text."""
    table: dict[str, np.ndarray] = {}
    if split.dataset.responses is not None:
        emb = split.answer_emb.numpy()
        for (i, m), text in np.ndenumerate(split.dataset.responses):
            table.setdefault("" if text is None else str(text), emb[i, m])
    dim = split.answer_emb.shape[-1]

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in table]
        if missing:
            raise KeyError(f"{len(missing)} answer texts are not in the cached split (first: {missing[0][:60]!r})")
        return np.stack([table[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)

    return embed


def refresh_query_embeddings(network, datamodule, names=("calibration", "val", "test")) -> None:
    """Re-encode the queries of the given splits with a fine-tuned query encoder (in place).

    The cached embeddings come from the frozen encoder; a network that carries its own encoder
    must see its own embeddings in calibration, λ fitting and evaluation.
    """
    if network.encoder is None:
        return
    for name in names:
        split = datamodule.splits[name]
        emb = encoding.encode_texts(list(split.dataset.queries), datamodule.tokenizer, network.encoder,
                                    "transformer", datamodule.max_length, truncation=datamodule.truncation)
        split.query_emb = torch.from_numpy(emb)


def bind_split(artifact: EstimatorArtifact, split, uncertainty: str | None = None, with_cost: bool = True):
    """Bind the artifact to an encoded split using its cached embeddings (no encoder run).

    ``features`` passed on include ``cost`` (the recorded cost, read only where a model ran).
    """
    ds = split.dataset
    feats = dict(ds.features)
    if with_cost:
        feats["cost"] = ds.cost
    return artifact.bind(
        ds.queries,
        ds.responses,
        feats,
        ds.tasks,
        query_embeddings=split.query_emb.numpy(),
        answer_embedder=split_embedding_lookup(split),
        uncertainty=uncertainty,
    )
