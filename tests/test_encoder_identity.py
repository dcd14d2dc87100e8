"""What identifies an encoder folder: cached embeddings follow its contents (a retrained encoder of the
same shapes saved over the same folder is not served the old embeddings), and MiniLM's own folder given
by path is referenced by an artifact like the default, not carried."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from cascade_routing.estimators import encoding
from cascade_routing.estimators.artifact import DEFAULT_ENCODER, encoder_reference

from estimators_helpers import WORDS, make_tiny_encoder


def _embed(cache: encoding.EmbeddingCache, folder, texts: list[str], calls: list) -> np.ndarray:
    tok = encoding.load_tokenizer(str(folder))
    enc = encoding.TextEncoder.from_path(str(folder))

    def compute(t):
        calls.append(len(t))
        return encoding.encode_texts(t, tok, enc, "transformer", 32)

    return cache.get_or_compute(texts, str(folder), "transformer", 32, compute)


def test_an_encoder_retrained_in_place_is_not_served_its_old_embeddings(tmp_path):
    folder = make_tiny_encoder(tmp_path / "encoder")
    cache = encoding.EmbeddingCache(tmp_path / "cache")
    texts = [" ".join(WORDS[i:i + 4]) for i in range(6)]
    calls: list = []
    before = _embed(cache, folder, texts, calls)
    assert np.array_equal(_embed(cache, folder, texts, calls), before) and len(calls) == 1  # cached
    sizes = {f.name: f.stat().st_size for f in folder.iterdir()}
    model = encoding.load_encoder_model(str(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # "retrained": other weights, same shapes, same file sizes
    model.save_pretrained(folder)
    assert {f.name: f.stat().st_size for f in folder.iterdir()} == sizes
    assert encoding.encoder_fingerprint(str(folder))  # unchanged by design (names and sizes) ...
    after = _embed(cache, folder, texts, calls)
    assert len(calls) == 2  # ... but the cache key follows the contents: computed again
    assert not np.allclose(after, before)


def test_minilms_own_folder_given_by_path_is_referenced_not_carried():
    path = encoding.default_encoder_path()
    datamodule = SimpleNamespace(resolved_encoder_path=path, encoder_path=path, max_length=128, truncation="left",
                                 answer_max_length=64, answer_encoding="token_bag", answer_truncation="right")
    ref, extra = encoder_reference(datamodule, SimpleNamespace(encoder=None))
    assert ref["path"] == DEFAULT_ENCODER and "carried" not in ref and extra == {}
