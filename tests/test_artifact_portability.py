"""An artifact copied to another machine works without the encoder folder it was trained with.

An artifact trained on a user's own frozen encoder carries the encoder's weights and config; when
that encoder's vocabulary differs from the default MiniLM's, its tokenizer's files travel inside the
file too (uint8 tensors ``tokenizer/<name>``), read back offline with ``transformers`` and checked by
vocabulary fingerprint. Older artifacts without them still read the folder; a tampered or foreign
embedded tokenizer is refused; a fine-tuned artifact still needs its frozen encoder's folder and
says so by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_routing.calibration.build import build_artifact
from cascade_routing.estimators import artifact as artifact_module
from cascade_routing.estimators import encoding
from cascade_routing.estimators.artifact import (
    ArtifactError,
    EstimatorArtifact,
    load_artifact,
    tokenizer_files_of,
    tokenizer_from_files,
)

from estimators_helpers import WORDS, train_tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def _moved_away(folder: Path):
    """``folder`` renamed for the block (as on a server it was never copied to), then put back."""
    away = folder.with_name(folder.name + "-moved")
    folder.rename(away)
    try:
        yield away
    finally:
        away.rename(folder)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A tiny estimator on the tiny encoder (its own 56-token vocabulary, not MiniLM's), λ fitted, saved."""
    tmp = tmp_path_factory.mktemp("own")
    torch.set_num_threads(1)
    module, dm, trainer, ds = train_tiny(tmp, n=120, m=3, epochs=1)
    art = build_artifact(module, dm, strategies=("cascade_routing",), budgets_per_pair=1, select_modes=None,
                         progress=False)
    path = art.save(tmp / "own.safetensors")
    return {"art": art, "path": path, "encoder": tmp / "encoder", "cache": tmp / "cache", "dm": dm, "tmp": tmp}


def _estimates(art: EstimatorArtifact, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Ex-ante and post-hoc (half the rows ran model 0: their answers are embedded) means on the test split."""
    ds = dm.splits["test"].dataset
    n, m = len(ds.queries), len(ds.models)
    rows, ran = torch.arange(n), torch.zeros(n, m, dtype=torch.bool)
    ran[::2, 0] = True
    q, _ = art.bind(ds.queries, ds.responses, ds.features, ds.tasks)
    return q.estimate(rows, torch.zeros_like(ran)).mean, q.estimate(rows, ran).mean


def test_own_vocabulary_artifact_serves_without_the_encoder_folder(own):
    from cascade_routing.serving import CascadeRouter

    art = own["art"]
    assert art.encoder["carried"] == "frozen" and art.encoder["tokenizer"] == str(own["encoder"].resolve())
    assert sorted(art.tokenizer_files) == ["tokenizer.json", "tokenizer_config.json"]
    before = _estimates(load_artifact(own["path"]), own["dm"])  # folder present
    folder = own["tmp"] / "saved"
    art.save_pretrained(folder)
    shutil.rmtree(own["cache"], ignore_errors=True)
    with _moved_away(own["encoder"]):
        for loaded in (load_artifact(own["path"]), EstimatorArtifact.from_pretrained(folder)):
            assert sorted(loaded.tokenizer_files) == ["tokenizer.json", "tokenizer_config.json"]
            after = _estimates(loaded, own["dm"])
            torch.testing.assert_close(after[0], before[0])
            torch.testing.assert_close(after[1], before[1])
        # the server's startup check binds a probe query through the encoder and tokenizer
        router = CascadeRouter.from_checkpoint(own["path"], budget=max(art.fitted["cascade_routing"]))
        assert router.models == art.models


def test_embedded_tokenizer_gives_the_folders_token_ids(own):
    """Long texts with every truncation, accents, unknown words: the same ids as the encoder folder's tokenizer."""
    folder_tok = encoding.load_tokenizer(str(own["encoder"]))
    rng = np.random.default_rng(0)
    texts = ["", "W1 ALPHA, beta; naïve zzz-unknown 日本 🙂", " ".join(rng.choice(WORDS, size=400)),
             "\n".join(rng.choice(WORDS, size=90)), "alpha" * 50]
    with _moved_away(own["encoder"]):
        tok = load_artifact(own["path"]).tokenizer()
    assert tok.get_vocab() == folder_tok.get_vocab()
    assert tok(texts)["input_ids"] == folder_tok(texts)["input_ids"]
    for truncation in encoding.TRUNCATIONS:
        for max_length in (8, 33, 128):
            want = encoding.tokenize(texts, folder_tok, max_length, truncation)
            assert encoding.tokenize(texts, tok, max_length, truncation) == want
            assert max(map(len, want)) == max_length  # the long texts were cut


def test_minilm_tokenizer_round_trips_through_embedded_files():
    """A real 30k WordPiece vocabulary (MiniLM's): the embedded files give the same tokenizer."""
    folder = encoding.default_encoder_path()
    tok = encoding.load_tokenizer(folder)
    files = tokenizer_files_of(tok)
    assert set(files) <= set(artifact_module.TOKENIZER_FILES) and "tokenizer.json" in files
    # compacted: not larger than the tokenizer.json MiniLM ships (466 KB), next to its 91 MB of weights
    assert len(files["tokenizer.json"]) <= (Path(folder) / "tokenizer.json").stat().st_size + 1024
    back = tokenizer_from_files(files)
    assert encoding.tokenizer_object_fingerprint(back) == encoding.tokenizer_fingerprint(folder)
    texts = ["What is the capital of France? Answer: Paris.", "Ünïcödé naïve café — 日本語のテキスト 🙂",
             " ".join(["The quick brown fox jumps over the lazy dog."] * 200)]
    assert back(texts, verbose=False)["input_ids"] == tok(texts, verbose=False)["input_ids"]
    for truncation in encoding.TRUNCATIONS:
        for max_length in (16, 128, 512):
            assert encoding.tokenize(texts, back, max_length, truncation) == encoding.tokenize(texts, tok, max_length, truncation)


def test_default_minilm_reference_embeds_nothing(own, tmp_path):
    """The default MiniLM (frozen, or a student sharing its vocabulary) stays a reference: nothing embedded."""
    from safetensors import safe_open

    art = own["art"]
    for encoder in ({"path": "default", "fingerprint": None, "max_length": 64, "answer_max_length": 64,
                     "answer_encoding": "token_bag"},
                    {**art.encoder, "tokenizer": "default"}):
        ref = dataclasses.replace(art, encoder=encoder, tokenizer_files={}, _network=None, _text=None)
        assert ref.embed_tokenizer() is False and ref.tokenizer_files == {}
        assert "tokenizer_files" not in ref.payload()["encoder"]
        with safe_open(str(ref.save(tmp_path / "ref.safetensors")), framework="pt") as fh:
            assert not [k for k in fh.keys() if k.startswith("tokenizer/")]


def _without_embedded_tokenizer(own, path: Path) -> Path:
    """The artifact as written before tokenizers were embedded: the folder path only."""
    old = dataclasses.replace(own["art"], tokenizer_files={}, _network=None, _text=None, _answer_tokenizer=None)
    old.save(path)
    assert "tokenizer_files" not in json.loads(_metadata(path)["payload"])["encoder"]
    return path


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_older_artifact_reads_the_folder_names_it_when_missing_and_can_embed_it(own, tmp_path):
    old = _without_embedded_tokenizer(own, tmp_path / "old.safetensors")
    queries = own["dm"].splits["test"].dataset.queries[:3]
    want = load_artifact(old).embed_queries(queries)  # folder present: read from it, as before
    with _moved_away(own["encoder"]) as away:
        with pytest.raises(ArtifactError, match="needs the tokenizer folder") as err:
            load_artifact(old).embed_queries(queries)
        assert str(own["encoder"].resolve()) in str(err.value)
        # a copy of the folder at another path (checked by fingerprint) embeds the tokenizer into it
        upgraded = load_artifact(old)
        assert upgraded.embed_tokenizer(away) is True
        upgraded.save(tmp_path / "upgraded.safetensors")
        np.testing.assert_allclose(load_artifact(tmp_path / "upgraded.safetensors").embed_queries(queries), want,
                                   rtol=1e-5, atol=1e-6)
    from transformers import BertTokenizerFast

    other = tmp_path / "other"  # the same words, other ids
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS[::-1]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(other)
    with pytest.raises(ArtifactError, match="vocabulary fingerprint .* is not the one"):
        load_artifact(old).embed_tokenizer(other)


def test_a_tokenizer_that_reads_back_differently_is_not_embedded(own, monkeypatch):
    """Files whose tokenizer keeps the vocabulary fingerprint but not the special tokens: a warning, the
    folder kept (the fingerprint alone would not notice)."""
    real = artifact_module.tokenizer_files_of

    def altered(tok):
        files = real(tok)
        config = {**json.loads(files["tokenizer_config.json"]), "cls_token": "[MASK]"}
        return {**files, "tokenizer_config.json": json.dumps(config).encode()}

    monkeypatch.setattr(artifact_module, "tokenizer_files_of", altered)
    art = dataclasses.replace(own["art"], tokenizer_files={}, _network=None, _text=None)
    back = tokenizer_from_files(altered(encoding.load_tokenizer(str(own["encoder"]))))
    assert encoding.tokenizer_object_fingerprint(back) == art.encoder["tokenizer_fingerprint"]
    with pytest.warns(UserWarning, match=r"is not embedded in the artifact \(its all_special_ids changes when "
                                         r"read back from its files\); the artifact refers to that folder: copy it"):
        assert art.embed_tokenizer() is False
    assert art.tokenizer_files == {}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """``src`` with its tensors and payload passed through ``edit(tensors, payload)``, saved as ``dst``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    payload = json.loads(meta["payload"])
    edit(tensors, payload)
    save_file(tensors, str(dst), metadata={**meta, "payload": json.dumps(payload)})
    return dst


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _edit_file(name: str, change):
    def edit(tensors, payload):
        key = "tokenizer/" + name
        tensors[key] = _as_tensor(change(tensors[key].numpy().tobytes()))
    return edit


def _swap_two_ids(data: bytes) -> bytes:
    spec = json.loads(data)
    vocab = spec["model"]["vocab"]
    vocab["alpha"], vocab["beta"] = vocab["beta"], vocab["alpha"]
    return json.dumps(spec).encode()


def _with_auto_map(data: bytes) -> bytes:
    return json.dumps({**json.loads(data), "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}).encode()


@pytest.mark.parametrize("edit, when, message", [
    (_edit_file("tokenizer.json", _swap_two_ids), "use", r"embedded .*fingerprint .*not the one .*altered or is corrupt"),
    (_edit_file("tokenizer.json", lambda data: data[: len(data) // 2]), "use", "embedded tokenizer cannot be read"),
    (_edit_file("tokenizer_config.json", _with_auto_map), "use", r"sets \['auto_map'\].*refused"),
    (lambda tensors, payload: (tensors.__setitem__("tokenizer/vocab.pkl", _as_tensor(b"\x80\x04N.")),
                               payload["encoder"]["tokenizer_files"].append("vocab.pkl")),
     "load", r"embeds the tokenizer files .*vocab\.pkl.*refused without reading them"),
    (lambda tensors, payload: tensors.pop("tokenizer/tokenizer_config.json"), "load",
     r"lists the embedded tokenizer files .* but holds \['tokenizer.json'\]"),
    (lambda tensors, payload: tensors.__setitem__("tokenizer/tokenizer.json", torch.zeros(3)), "load",
     r"tensor tokenizer/tokenizer.json is torch.float32 \(3,\), expected the file's bytes"),
])
def test_a_tampered_or_foreign_embedded_tokenizer_is_refused(own, tmp_path, edit, when, message):
    """Even with the encoder folder present (it is never read instead): a clear error, no code run."""
    bad = _rewrite(own["path"], tmp_path / "bad.safetensors", edit)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(bad).tokenizer()
    assert (when == "load") == ("checkpoint" in str(err.value)), err.value


def test_finetuned_artifact_of_an_own_encoder_names_the_folder_it_needs(tmp_path):
    """Answers are embedded by the frozen encoder it was fine-tuned from: without that folder, an error
    naming it and why (was a FileNotFoundError about a distilled student)."""
    module, dm, trainer, ds = train_tiny(tmp_path, n=120, m=2, epochs=1, finetune=True)
    art = build_artifact(module, dm, fit_lambdas=False, select_modes=None, progress=False)
    assert art.encoder["carried"] == "finetuned" and art.tokenizer_files == {}
    path = art.save(tmp_path / "ft.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_artifact(path).embed_tokenizer() is False  # the tokenizer alone would not make it portable
    with _moved_away(tmp_path / "encoder"):
        loaded = load_artifact(path)  # the fine-tuned encoder is rebuilt from the payload's config
        with pytest.raises(ArtifactError, match=r"needs the encoder folder .*fine-tuned query encoder.*copy that "
                                                r"folder along") as err:
            loaded.bind(ds.queries[:2], None, None, ds.tasks[:2])
        assert str((tmp_path / "encoder").resolve()) in str(err.value)
