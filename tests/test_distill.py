"""Distilling a student encoder, and artifacts that carry it (work without the student folder)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cascade_routing.estimators import encoding
from cascade_routing.estimators.artifact import ArtifactError, load_artifact
from cascade_routing.training.distill import StudentConfig, distill_encoder, init_embeddings_from_teacher

from estimators_helpers import WORDS, make_synthetic_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_teacher(folder, hidden: int = 32):
    """A random BertModel + a tokenizer that knows ``WORDS`` (transformers 5 takes ``vocab=``, a dict)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def _texts(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def test_distillation_lowers_loss_and_writes_loadable_folder(tmp_path):
    teacher = _tiny_teacher(tmp_path / "teacher")
    texts = _texts(200)
    assert encoding.load_tokenizer(str(teacher)).tokenize(texts[0]) == texts[0].split()  # no [UNK]
    res = distill_encoder(texts, tmp_path / "student", str(teacher), StudentConfig(layers=1, hidden=16, heads=2),
                          epochs=6, batch_size=16, lr=3e-3, heldout_fraction=0.1, cache_dir=tmp_path / "cache",
                          progress=False)
    # held-out texts never trained on: the relative MSE drops clearly, and per-epoch training loss falls
    assert res.heldout_loss_initial > 0.5 and res.heldout_loss_final < 0.7 * res.heldout_loss_initial, res
    assert res.train_loss_per_epoch[-1] < res.train_loss_per_epoch[0]
    assert res.texts_heldout == 20 and res.texts_train == 180
    # a normal Hugging Face folder: model + the teacher's tokenizer
    model = encoding.load_encoder_model(str(tmp_path / "student"))
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    # the weights' digest sits in config.json, so the embedding-cache key changes when re-distilled
    from cascade_routing.training.distill import weights_digest

    assert model.config.distillation_id == weights_digest(model)
    assert (tmp_path / "student" / "model.safetensors").exists()
    tok = encoding.load_tokenizer(str(tmp_path / "student"))
    assert tok.get_vocab() == encoding.load_tokenizer(str(teacher)).get_vocab()
    assert encoding.tokenizer_fingerprint(str(tmp_path / "student")) == encoding.tokenizer_fingerprint(str(teacher))
    report = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert report["heldout_loss_final"] == res.heldout_loss_final
    # the saved student reproduces the trained one's embeddings through the pipeline's encoder
    enc = encoding.TextEncoder(model)
    emb = encoding.encode_texts(texts[:8], tok, enc, "transformer", 128)
    assert emb.shape == (8, 16) and np.isfinite(emb).all()


def test_embedding_init_projects_teacher_and_rejects_other_vocabulary(tmp_path):
    from transformers import BertConfig, BertModel

    teacher = encoding.load_encoder_model(str(_tiny_teacher(tmp_path / "t")))
    vocab = teacher.config.vocab_size
    student = BertModel(BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=64))
    kept = init_embeddings_from_teacher(student, teacher)
    assert 0 < kept <= 1
    # the 8 projected coordinates reproduce the teacher's centered word embeddings' top-8 structure:
    w_t = teacher.embeddings.word_embeddings.weight.detach()
    w_s = student.embeddings.word_embeddings.weight.detach()
    c = w_t - w_t.mean(0)
    residual = c - w_s @ torch.linalg.pinv(w_s) @ c
    assert float((residual**2).sum() / (c**2).sum()) == pytest.approx(1 - kept, abs=1e-4)
    other = BertModel(BertConfig(vocab_size=vocab + 3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=64))
    with pytest.raises(ValueError, match="vocabulary"):
        init_embeddings_from_teacher(other, teacher)


def _train_with_encoder(tmp_path, encoder_path: str, n: int = 120, m: int = 3, epochs: int = 2):
    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    ds = make_synthetic_dataset(n, m, 0)
    dm = RoutingDataModule.from_dataset(ds, encoder_path=encoder_path, cache_dir=str(tmp_path / "cache"), batch_size=32)
    L.seed_everything(0, verbose=False)
    module = QualityEstimatorModule(hidden=32, lr=3e-3)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    return module, dm, ds


@pytest.fixture(scope="module")
def student_artifact(tmp_path_factory):
    """A tiny student folder with the real default MiniLM tokenizer, heads trained on it, artifact saved."""
    from cascade_routing.calibration.build import build_artifact

    from transformers import AutoConfig, BertModel

    from cascade_routing.training.distill import student_bert_config

    tmp = tmp_path_factory.mktemp("student")
    # what distill_encoder writes (test above), built directly to keep this fast: a small BertModel
    # with the default MiniLM's vocabulary + the MiniLM tokenizer files
    teacher = encoding.default_encoder_path()
    torch.manual_seed(0)
    cfg = student_bert_config(AutoConfig.from_pretrained(teacher, local_files_only=True),
                              StudentConfig(layers=1, hidden=16, heads=2))
    BertModel(cfg).save_pretrained(tmp / "student")
    encoding.load_tokenizer(teacher).save_pretrained(tmp / "student")
    module, dm, ds = _train_with_encoder(tmp, str(tmp / "student"))
    art = build_artifact(module, dm, fit_lambdas=False, select_modes=None, progress=False)
    path = art.save(tmp / "student.safetensors")
    return {"art": art, "path": path, "ds": ds, "tmp": tmp, "dm": dm}


def test_student_artifact_predicts_identically_without_the_student_folder(student_artifact):
    art, ds, tmp = student_artifact["art"], student_artifact["ds"], student_artifact["tmp"]
    assert art.encoder["carried"] == "frozen" and art.encoder["tokenizer"] == "default"
    assert art.encoder["hf_config"]["hidden_size"] == 16
    n, m = len(ds.queries), ds.num_models
    rows = torch.arange(n)
    ran = torch.zeros(n, m, dtype=torch.bool)
    ran[::2, 0] = True  # post-hoc for half the rows: reads their answers, encoded by the student
    ran[::3, 1] = True
    q1, _ = art.bind(ds.queries, ds.responses, ds.features, ds.tasks)
    before_ex, before_post = q1.estimate(rows, torch.zeros_like(ran)), q1.estimate(rows, ran)
    shutil.rmtree(tmp / "student")
    shutil.rmtree(tmp / "cache")
    loaded = load_artifact(student_artifact["path"])
    assert loaded.format_version == 2
    q2, _ = loaded.bind(ds.queries, ds.responses, ds.features, ds.tasks)
    torch.testing.assert_close(q2.estimate(rows, torch.zeros_like(ran)).mean, before_ex.mean)
    torch.testing.assert_close(q2.estimate(rows, ran).mean, before_post.mean)
    # and equal to the training-time path (cached embeddings of the data module)
    from cascade_routing.calibration.binding import bind_split

    test = student_artifact["dm"].splits["test"]
    k = len(test.dataset.queries)
    q3, _ = bind_split(loaded, test)
    q4, _ = loaded.bind(test.dataset.queries, test.dataset.responses, test.dataset.features, test.dataset.tasks)
    r = torch.arange(k)
    z = torch.zeros(k, m, dtype=torch.bool)
    torch.testing.assert_close(q3.estimate(r, z).mean, q4.estimate(r, z).mean, atol=1e-5, rtol=1e-4)


def test_tokenizer_vocabulary_mismatch_is_a_clear_error(student_artifact, tmp_path, monkeypatch):
    # the artifact's carried student was trained with the default MiniLM tokenizer; if "default"
    # now resolves to a different vocabulary, token ids would index the wrong rows: refuse.
    other = _tiny_teacher(tmp_path / "other", hidden=16)
    monkeypatch.setattr(encoding, "default_encoder_path", lambda: str(other))
    loaded = load_artifact(student_artifact["path"])
    ds = student_artifact["ds"]
    with pytest.raises(ArtifactError, match=r"tokenizer at .*vocabulary fingerprint .* not the one"):
        loaded.bind(ds.queries[:4], None, None, ds.tasks[:4])


def test_version_1_artifact_without_carried_encoder_still_loads(student_artifact, tmp_path):
    """A format-1 file (default MiniLM reference, no encoder tensors, no hf_config) loads as before."""
    from safetensors.torch import safe_open, save_file

    with safe_open(str(student_artifact["path"]), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith("net.encoder.")}
    payload = json.loads(meta["payload"])
    enc = payload["encoder"]
    payload["encoder"] = {k: enc[k] for k in ("max_length", "answer_max_length", "answer_encoding")}
    payload["encoder"].update(path="default", fingerprint=None)
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={**meta, "format_version": "1", "payload": json.dumps(payload)})
    art = load_artifact(v1)
    assert art.format_version == 1 and art.network().encoder is None
    ds = student_artifact["ds"]
    emb = np.zeros((4, art.network_config["embed_dim"]), np.float32)
    qe, _ = art.bind(ds.queries[:4], None, None, ds.tasks[:4], query_embeddings=emb)
    assert qe.estimate(torch.arange(4), torch.zeros(4, ds.num_models, dtype=torch.bool)).mean.shape == (4, ds.num_models)


def test_distillation_refuses_zero_epochs_before_the_teacher_pass(tmp_path, monkeypatch, capsys):
    """``epochs=0`` used to run the teacher over every text, train nothing and write the untrained student."""
    import cascade_routing.training.distill as distill
    from cascade_routing.cli import main

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(distill, "_load_teacher", no_teacher)
    for kwargs in ({"epochs": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="epochs >= 1 and batch_size >= 1"):
            distill_encoder(_texts(20), tmp_path / "student", **kwargs)
    assert not (tmp_path / "student").exists()
    base = ["distill-encoder", "--dataset", "routerbench-subset", "--out", str(tmp_path / "cli")]
    for extra, message in ((["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
                           (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
                           (["--split", "train=0.8"], "argument --split: not JSON"),
                           (["--split", "[0.8, 0.2]"], "argument --split: expected a JSON object")):
        with pytest.raises(SystemExit):
            main(base + extra)
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "cli").exists()
