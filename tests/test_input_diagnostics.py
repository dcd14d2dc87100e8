"""Truncation modes and the input-distinctness / shared-prefix warnings (data import, datamodule setup)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cascade_routing.cli import main
from cascade_routing.data import diagnostics
from cascade_routing.data.dataset import RoutingDataset
from tests.estimators_helpers import WORDS, make_synthetic_dataset, make_tiny_encoder

PREFIX = " ".join(WORDS[:40] * 4)  # 160 tokens of the tiny vocabulary, 599 characters


def with_prefix(ds: RoutingDataset, prefix: str = PREFIX) -> RoutingDataset:
    """The same dataset with every query opened by the same few-shot-like ``prefix``."""
    return RoutingDataset(queries=[f"{prefix} {q}" for q in ds.queries], models=ds.models, quality=ds.quality,
                          cost=ds.cost, responses=ds.responses, features=ds.features, tasks=ds.tasks,
                          name=ds.name + "-prefixed")


def distinct_rows(emb) -> int:
    return int(np.unique(np.round(emb.numpy(), 4), axis=0).shape[0])


# ---------------------------------------------------------------- text-only checks (no tokenizer)
def test_shared_prefixes_finds_each_group_with_its_length() -> None:
    a, b = "A" * 700, "B" * 520
    queries = [f"{a}|{i:03d}" for i in range(30)] + [f"{b}#{i}" for i in range(12)] + [f"free {i}" for i in range(8)]
    groups = diagnostics.shared_prefixes(queries + queries[:5])  # repeated queries count once
    assert [(g.count, g.length) for g in groups] == [(30, 701 + 1), (12, 521)]
    assert groups[0].prefix == a + "|0"
    assert diagnostics.shared_prefixes(queries, min_chars=710) == []
    assert diagnostics.shared_prefixes(queries, min_share=0.7) == []  # 30 of 50 distinct: below 70%
    msg = diagnostics.prefix_messages(queries)[0]
    assert "30 of 50 distinct queries (60%) start with the same 702 characters" in msg
    assert "use data.truncation: left" in msg
    kept_end = diagnostics.prefix_messages(queries, truncation="left")[0]  # advice for what is in use
    assert "use data.truncation: left" not in kept_end and "keeps the end of a long prompt" in kept_end


def test_collapse_message_names_the_numbers() -> None:
    queries = [f"q{i}" for i in range(2160)]
    d = diagnostics.input_distinctness(queries, [[101, 7, 102]] * 2160)
    assert (d.queries, d.inputs) == (2160, 1)
    msg = diagnostics.collapse_message(d, 128, "right")
    assert msg.startswith("2,160 distinct queries became 1 distinct encoder input after right truncation to 128 tokens")
    assert "try data.truncation: left or head_tail," in msg
    assert "try data.truncation: head_tail," in diagnostics.collapse_message(d, 128, "left")  # not what it uses
    assert diagnostics.collapse_message(diagnostics.Distinctness(100, 95), 128, "right") is None
    with pytest.raises(ValueError, match="3 encoder inputs for 2 queries"):
        diagnostics.input_distinctness(["a", "b"], [[1], [2], [3]])


# ---------------------------------------------------------------- truncation
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("enc"))


def test_tokenize_keeps_the_chosen_part(tiny_encoder: Path) -> None:
    from cascade_routing.estimators import encoding

    tok = encoding.load_tokenizer(str(tiny_encoder))
    text = " ".join(WORDS[:30])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    right = encoding.tokenize([text, "w1"], tok, 10, "right")
    assert right == tok([text, "w1"], truncation=True, max_length=10)["input_ids"]  # Hugging Face's default
    assert encoding.tokenize([text], tok, 10, "left")[0] == [cls, *ids[-8:], sep]
    assert encoding.tokenize([text], tok, 10, "head_tail")[0] == [cls, *ids[:2], *ids[-6:], sep]
    assert encoding.tokenize(["w1 w2"], tok, 10, "head_tail")[0] == tok("w1 w2")["input_ids"]  # short: untouched
    with pytest.raises(ValueError, match="unknown truncation 'middle'"):
        encoding.tokenize([text], tok, 10, "middle")
    with pytest.raises(ValueError, match="no room for content"):
        encoding.tokenize([text], tok, 2, "left")


def _tricky_text(rng: np.random.Generator, words: int) -> str:
    """Words, punctuation, accents, CJK, a Greek final sigma, over-long words and odd whitespace
    (tab, CR, NBSP, and the control character \\x1c that BERT deletes rather than splits on)."""
    pieces = ["the", "Model", "answer:", "naïve", "ΣΊΣΥΦΟΣ", "日本語の", "don't", "e.g.,", "(b)", "x" * 120,
              "42.5%", "def", "f(x):", "return", "ﬁne", "Ünïcödé"]
    seps = [" ", " ", " ", "\n", "\t", "\r\n", "\u00a0", "\x1c", "", "  "]
    return "".join(pieces[rng.integers(len(pieces))] + seps[rng.integers(len(seps))] for _ in range(words))


@pytest.mark.parametrize("chars_per_token", [2, 3, None])  # None: the module's own
def test_windowed_tokenize_equals_tokenizing_the_whole_text(chars_per_token: int | None, monkeypatch) -> None:
    """Long texts are tokenized only in windows (BERT's word-local tokenizer); the ids are those of
    the whole text cut by each truncation, for texts around and far past the window sizes (narrow
    windows hold about as many tokens as are kept, so a wrong cut would show)."""
    from cascade_routing.estimators import encoding

    if chars_per_token is not None:
        monkeypatch.setattr(encoding, "WINDOW_CHARS_PER_TOKEN", chars_per_token)

    tok = encoding.load_tokenizer(encoding.default_encoder_path())
    assert encoding.word_local(tok)
    rng = np.random.default_rng(0)
    texts = [_tricky_text(rng, int(n)) for n in rng.integers(5, 700, size=120)]
    texts += ["a" * 5000, "word " * 3000, "x " + "y" * 4000]  # no cut near the window / one long word

    class Spy:
        def __init__(self) -> None:
            self.backend_tokenizer = tok.backend_tokenizer
            self.chars = 0

        def __call__(self, batch, **kwargs):
            self.chars += sum(len(t) for t in ([batch] if isinstance(batch, str) else batch))
            return tok(batch, **kwargs)

    lead, trail = [tok.cls_token_id], [tok.sep_token_id]
    for max_length in (16, 64, 128):
        keep = max_length - 2
        whole = tok(texts, add_special_tokens=False)["input_ids"]
        for truncation in ("right", "left", "head_tail"):
            spy = Spy()
            got = encoding.tokenize(texts, spy, max_length, truncation)
            want = [lead + encoding.truncate_ids(ids, keep, truncation) + trail for ids in whole]
            bad = [i for i in range(len(texts)) if got[i] != want[i]]
            assert not bad, f"max_length {max_length}, {truncation}: texts {bad[:5]} differ"
            if chars_per_token is None:  # the windows were used
                assert spy.chars < 0.6 * sum(len(t) for t in texts), (max_length, truncation, spy.chars)


def test_windows_are_not_used_for_tokenizers_that_are_not_word_local() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cascade_routing.estimators import encoding

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "Ġa": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert not encoding.word_local(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert encoding.word_local(encoding.load_tokenizer(encoding.default_encoder_path()))


def test_cache_key_includes_truncation(tiny_encoder: Path, tmp_path: Path) -> None:
    from cascade_routing.estimators import encoding

    cache = encoding.EmbeddingCache(tmp_path)
    keys = {t: cache.key(str(tiny_encoder), "transformer", 32, ["a b"], t) for t in encoding.TRUNCATIONS}
    assert len(set(keys.values())) == 3


# ---------------------------------------------------------------- the datamodule (train.py fit / train-eval)
def test_shared_prefix_dataset_warns_with_right_truncation_and_trains_on_distinct_inputs(
    tiny_encoder: Path, tmp_path: Path
) -> None:
    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    ds = with_prefix(make_synthetic_dataset(120, 3))
    kw = dict(encoder_path=str(tiny_encoder), cache_dir=str(tmp_path / "cache"), batch_size=32, max_length=32)

    right = RoutingDataModule.from_dataset(ds, truncation="right", **kw)
    with pytest.warns(diagnostics.InputCollapseWarning) as caught:
        right.setup("fit")
    texts = [str(w.message) for w in caught]
    assert any("120 distinct queries became 1 distinct encoder input after right truncation to 32 tokens" in t
               for t in texts), texts
    assert any("120 of 120 distinct queries (100%) start with the same" in t for t in texts), texts
    assert distinct_rows(right.splits["train"].query_emb) == 1  # the collapse, reproduced

    left = RoutingDataModule.from_dataset(ds, **kw)  # the default truncation
    assert left.truncation == "left" and left.data_config()["truncation"] == "left"
    L.seed_everything(0, verbose=False)
    module = QualityEstimatorModule(hidden=16, lr=3e-3, neighbours=0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagnostics.InputCollapseWarning)
        trainer.fit(module, left)  # setup runs the checks: nothing to warn about
    assert left.input_messages == []
    train = left.splits["train"]
    assert distinct_rows(train.query_emb) == len(set(train.dataset.queries))


# ---------------------------------------------------------------- data import
def test_data_import_warns_loudly_with_the_numbers(tmp_path: Path, capsys) -> None:
    prefix = "Answer with the letter of the correct option. " * 30  # 1,380 characters, ~270 MiniLM tokens
    table = tmp_path / "fewshot.jsonl"
    table.write_text("".join(json.dumps({"q": f"{prefix}Question {i}: which is {i}?", "a": i % 2, "ca": 0.1,
                                         "b": 1, "cb": 0.5}) + "\n" for i in range(40)))
    mapping = json.dumps({"query": "q", "models": {"m-a": {"quality": "a", "cost": "ca"}, "m-b": {"quality": "b", "cost": "cb"}}})
    args = ["data", "import", str(table), "--mapping", mapping, "-o", str(tmp_path / "saved")]
    assert main([*args, "--truncation", "right"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "WARNING" in err
    assert "40 distinct queries became 1 distinct encoder input after right truncation to 128 tokens" in err
    assert "40 of 40 distinct queries (100%) start with the same" in err
    assert main(args) == 0  # the default (left) keeps the questions apart: only the prefix is reported
    err = " ".join(capsys.readouterr().err.split())
    assert "became" not in err and "start with the same" in err
