"""Training a tiny estimator, the artifact round trip, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_routing.estimators.artifact import ArtifactError, load_artifact
from cascade_routing.calibration.binding import bind_split
from cascade_routing.calibration.build import build_artifact

from estimators_helpers import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    module, dm, trainer, ds = train_tiny(tmp, n=240, m=3, epochs=6)
    art = build_artifact(module, dm, strategies=("routing", "cascade_routing"), budgets_per_pair=1, progress=False)
    path = art.save(tmp / "est.safetensors")
    return {"module": module, "dm": dm, "trainer": trainer, "ds": ds, "art": art, "path": path, "tmp": tmp}


def test_training_lowers_loss_and_logs_metrics(tmp_path):
    from estimators_helpers import make_synthetic_dataset  # noqa: F401  (same data as train_tiny)

    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule
    from estimators_helpers import make_tiny_encoder

    enc = make_tiny_encoder(tmp_path / "enc")
    dm = RoutingDataModule.from_dataset(make_synthetic_dataset(240, 3), encoder_path=str(enc),
                                        cache_dir=str(tmp_path / "cache"), batch_size=32)
    dm.setup("fit")
    module = QualityEstimatorModule(hidden=32, lr=3e-3)
    train = dm.splits["train"]
    module.build(dm.models, dm.embed_dim, len(dm.task_vocabulary), dm.binary_quality, memory=(train.query_emb, train.quality))
    batch = next(iter(dm.val_dataloader()))

    def loss_now() -> float:
        module.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            return float(module.loss(batch)[1]["mean_loss"])

    before = loss_now()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    after = loss_now()
    assert after < before - 0.02, (before, after)
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/exante/auroc_mean", "val/posthoc/auroc_mean", "val/exante/brier_mean",
                "val/posthoc/ece_mean", "val/exante/auroc/model-0"):
        assert key in metrics, sorted(metrics)
    # post-hoc sees the run answers, which reveal correctness in the synthetic data
    assert float(metrics["val/posthoc/auroc_mean"]) > 0.8


def test_round_trip_gives_identical_predictions(trained):
    art, dm = trained["art"], trained["dm"]
    loaded = load_artifact(trained["path"], expected_models=art.models)
    assert loaded.models == art.models and loaded.prices == art.prices
    assert set(loaded.fitted) == {"routing", "cascade_routing"}
    for s in loaded.fitted:
        for b, f in art.fitted[s].items():
            g = loaded.fitted[s][b]
            assert torch.equal(f.lam_low, g.lam_low) and f.gamma == g.gamma
    test = dm.splits["test"]
    n, m = test.quality.shape
    rows = torch.arange(n)
    ran = test.eval_ran
    for mode in ("variance", "covariance"):
        q1, c1 = bind_split(art, test, uncertainty=mode)
        q2, c2 = bind_split(loaded, test, uncertainty=mode)
        e1, e2 = q1.estimate(rows, ran), q2.estimate(rows, ran)
        assert torch.equal(e1.mean, e2.mean)
        assert (e1.std is None or torch.equal(e1.std, e2.std)) and (e1.cov is None or torch.equal(e1.cov, e2.cov))
        assert torch.equal(c1.estimate(rows, ran), c2.estimate(rows, ran))
    # binding through the encoder (no cached embeddings) gives the same estimate as the cache
    ds = test.dataset
    q3, _ = loaded.bind(ds.queries, ds.responses, dict(ds.features), ds.tasks)
    torch.testing.assert_close(q3.estimate(rows, ran).mean, e1.mean, atol=1e-5, rtol=1e-4)


def test_bound_estimator_ignores_unrun_responses(trained):
    art, test = trained["art"], trained["dm"].splits["test"]
    ds = test.dataset
    n, m = ds.quality.shape
    ran = test.eval_ran
    rows = torch.arange(n)
    resp = ds.responses.copy()
    feats = {k: v.copy() for k, v in ds.features.items()}
    q1, c1 = art.bind(ds.queries, resp, feats, ds.tasks)
    e1, k1 = q1.estimate(rows, ran), c1.estimate(rows, ran)
    resp2 = resp.copy()
    feats2 = {k: v.copy() for k, v in feats.items()}
    unrun = ~ran.numpy()
    resp2[unrun] = "answer yes alpha beta gamma totally different"
    for v in feats2.values():
        v[unrun] = 1e6
    q2, c2 = art.bind(ds.queries, resp2, feats2, ds.tasks)
    e2 = q2.estimate(rows, ran)
    assert torch.equal(e1.mean, e2.mean)
    for a, b in ((e1.std, e2.std), (e1.cov, e2.cov)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(k1, c2.estimate(rows, ran))
    # and a run model's response does matter
    resp3 = resp.copy()
    b, j = map(int, np.argwhere(ran.numpy())[0])
    resp3[b, j] = "answer no w1 w2 w3 w4" if "yes" in str(resp[b, j]) else "answer yes alpha"
    q3, _ = art.bind(ds.queries, resp3, feats, ds.tasks)
    assert not torch.equal(q3.estimate(rows[b : b + 1], ran[b : b + 1]).mean, e1.mean[b : b + 1])


def test_artifacts_saved_before_the_confidence_encoding_read_the_log_prob_only(trained):
    """New training adds the log surprise; an artifact whose network config predates the field
    rebuilds the log-prob-only network it was trained as."""
    import dataclasses

    art = trained["art"]
    assert art.network_config["confidence_encoding"] == "logprob_and_surprise"
    loaded = load_artifact(trained["path"])
    assert loaded.network().config.confidence_encoding == "logprob_and_surprise"
    older_config = {k: v for k, v in art.network_config.items() if k != "confidence_encoding"}
    older_weights = dict(art.state_dict)
    older_weights["answer_feat_proj.weight"] = art.state_dict["answer_feat_proj.weight"][:, :-1].clone()
    older_weights["answer_feat_proj.weight"][:, art.network_config["num_answer_features"]:] = (
        art.state_dict["answer_feat_proj.weight"][:, art.network_config["num_answer_features"] + 1:])
    older = dataclasses.replace(art, network_config=older_config, state_dict=older_weights, _network=None)
    assert older.network().config.confidence_encoding == "logprob"
    # the same weights without the log surprise's column give the same ex-ante estimate (no answers read)
    test = trained["dm"].splits["test"]
    n, m = test.quality.shape
    rows, ran = torch.arange(n), torch.zeros(n, m, dtype=torch.bool)
    torch.testing.assert_close(bind_split(older, test)[0].estimate(rows, ran).mean,
                               bind_split(art, test)[0].estimate(rows, ran).mean)
    # a stored weight of the wrong width (an older network config with newer weights) is refused by name
    mixed = dataclasses.replace(art, network_config=older_config, _network=None)
    with pytest.raises(ArtifactError, match="answer_feat_proj.weight"):
        mixed.network()


def test_data_without_confidences_trains_the_log_prob_only_network(tmp_path):
    module, _, _, ds = train_tiny(tmp_path, n=80, m=2, epochs=1, confidence=False)
    assert "logprob_confidence" not in ds.features
    assert module.hparams.network_config["confidence_encoding"] == "logprob"
    assert module.network.answer_feat_proj.in_features == (4 + 2) + 1 + 2  # no log-surprise column


def test_cost_is_exact_once_run(trained):
    art, test = trained["art"], trained["dm"].splits["test"]
    ds = test.dataset
    n, m = ds.quality.shape
    _, ce = bind_split(art, test)
    all_ran = torch.ones(n, m, dtype=torch.bool)
    torch.testing.assert_close(ce.estimate(torch.arange(n), all_ran).double(), torch.from_numpy(ds.cost))


def test_live_fill_in_place(trained):
    """A server fills responses after binding; the estimator reads them once the model has run."""
    art, test = trained["art"], trained["dm"].splits["test"]
    ds = test.dataset
    n, m = ds.quality.shape
    resp = np.empty((2, m), dtype=object)
    feats = {"logprob_confidence": np.zeros((2, m))}
    qe, _ = art.bind(ds.queries[:2], resp, feats, ds.tasks[:2])
    ran = torch.zeros(2, m, dtype=torch.bool)
    ex = qe.estimate(torch.arange(2), ran).mean
    resp[:, 0] = ds.responses[:2, 0]
    feats["logprob_confidence"][:, 0] = ds.features["logprob_confidence"][:2, 0]
    ran[:, 0] = True
    post = qe.estimate(torch.arange(2), ran).mean
    full, _ = art.bind(ds.queries[:2], ds.responses[:2], {k: v[:2] for k, v in ds.features.items()}, ds.tasks[:2])
    torch.testing.assert_close(post, full.estimate(torch.arange(2), ran).mean)
    assert not torch.equal(ex, post)


# ---------------------------------------------------------------------------- bad checkpoints
def test_missing_and_corrupt(trained, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors")
    data = Path(trained["path"]).read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(garbage)


def test_foreign_safetensors_and_wrong_version(tmp_path, trained):
    from safetensors.torch import save_file
    from safetensors import safe_open

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not a cascade-routing estimator artifact"):
        load_artifact(foreign)
    with safe_open(str(trained["path"]), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    old = tmp_path / "v99.safetensors"
    save_file(tensors, str(old), metadata={**meta, "format_version": "99"})
    with pytest.raises(ArtifactError, match="format version '99'"):
        load_artifact(old)
    broken = tmp_path / "payload.safetensors"
    save_file(tensors, str(broken), metadata={**meta, "payload": json.dumps({"models": ["a"]})})
    with pytest.raises(ArtifactError, match="malformed payload"):
        load_artifact(broken)


def test_a_fitted_lambda_naming_a_model_outside_the_artifact_is_refused(tmp_path, trained):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(trained["path"]), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    payload = json.loads(meta["payload"])
    m = len(payload["models"])
    entry = {"lam_low": [0.0], "lam_high": [0.0], "gamma": 0.0, "budget": 1.0, "max_depth": 1}
    for models, problem in (([m], f"names model indices \\[{m}\\], but the artifact has {m} models"),
                            ([0, 0], "malformed payload")):
        payload["fitted"] = {"cascade_routing": [{**entry, "models": models, "table_budget": 1.0}]}
        bad = tmp_path / f"fitted-{len(models)}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "payload": json.dumps(payload)})
        with pytest.raises(ArtifactError, match=problem):
            load_artifact(bad)
    payload["fitted"] = {"cascade_routing": [{**entry, "models": [m - 1], "table_budget": 1.0}]}
    ok = tmp_path / "fitted-ok.safetensors"
    save_file(tensors, str(ok), metadata={**meta, "payload": json.dumps(payload)})
    assert load_artifact(ok).fitted["cascade_routing"][1.0].models == (m - 1,)


def test_model_list_mismatch(trained):
    art = trained["art"]
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(trained["path"], expected_models=["model-0", "model-1", "gpt-9"])
    with pytest.raises(ArtifactError, match="different order"):
        art.check_models(list(reversed(art.models)))
    ds = trained["ds"]
    with pytest.raises(ArtifactError, match="responses has shape"):
        art.bind(ds.queries[:3], ds.responses[:3, :2], None, None)


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, dump in (("raw.pkl", lambda p: p.write_bytes(pickle.dumps(_Hostile(marker)))),
                       ("torch.pt", lambda p: torch.save({"state_dict": _Hostile(marker)}, p))):
        path = tmp_path / name
        dump(path)
        with pytest.raises(ArtifactError, match="pickle"):
            load_artifact(path)
        assert not marker.exists()


def test_saved_artifact_mode_follows_the_umask(trained, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = trained["art"].save(tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user


def test_non_finite_weights_are_refused_by_name(trained, tmp_path):
    import dataclasses

    art = trained["art"]
    key = next(k for k, v in art.state_dict.items() if v.is_floating_point() and v.numel() > 1)
    weights = dict(art.state_dict)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    path = dataclasses.replace(art, state_dict=weights, _network=None).save(tmp_path / "nan.safetensors")
    with pytest.raises(ArtifactError, match=rf"net\.{key} has non-finite values \(1 of"):
        load_artifact(path)


def test_a_save_pretrained_folder_loads_everywhere_a_file_does(trained, tmp_path, capsys):
    from cascade_routing.cli import main

    folder = trained["art"].save_pretrained(tmp_path / "my-router").parent
    assert load_artifact(folder).models == trained["art"].models
    assert main(["inspect-artifact", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == trained["art"].models
    empty = tmp_path / "not-a-router"
    empty.mkdir()
    with pytest.raises(ArtifactError, match=r"'.*not-a-router' is a folder without estimator.safetensors"):
        load_artifact(empty)


def test_queries_and_answers_embed_concurrently_on_a_fresh_artifact(trained):
    """A server encodes queries on one thread and answers on another: on a freshly loaded artifact
    (lazy loads not done yet) the two run at once, build one network, use separate tokenizer
    instances, and give exactly the embeddings of a serial run."""
    from concurrent.futures import ThreadPoolExecutor

    ds = trained["ds"]
    queries = list(ds.queries[:48])
    answers = [str(r) for r in ds.responses[:16].ravel()]
    serial = load_artifact(trained["path"])
    want_q, want_a = serial.embed_queries(queries), serial.embed_answers(answers)

    fresh = load_artifact(trained["path"])
    with ThreadPoolExecutor(4) as pool:
        q_jobs = [pool.submit(fresh.embed_queries, queries) for _ in range(2)]
        a_jobs = [pool.submit(fresh.embed_answers, answers) for _ in range(2)]
        networks = [pool.submit(fresh.network) for _ in range(4)]
        got_q = [j.result() for j in q_jobs]
        got_a = [j.result() for j in a_jobs]
        assert len({id(j.result()) for j in networks}) == 1
    for got in got_q:
        np.testing.assert_allclose(got, want_q, rtol=1e-5, atol=1e-6)
    for got in got_a:
        np.testing.assert_allclose(got, want_a, rtol=1e-5, atol=1e-6)
    assert fresh._answer_tokenizer is not fresh._text_encoders()[0]


def test_answer_truncation_keeps_the_informative_end_and_travels_in_the_artifact(tmp_path):
    """Answers "answer answer alpha" (right) / "answer answer gamma" (wrong): equal lengths, the
    correctness only in the last token. With room for one content token, ``right`` truncation keeps
    "answer" for every cell (the answer says nothing) and ``left`` keeps the last token. The artifact
    records the setting and embeds answers with it at inference exactly as training did; an artifact
    without the setting reads ``right``."""
    import dataclasses

    from cascade_routing.evaluation.revealed import own_answer_auroc
    from estimators_helpers import make_synthetic_dataset

    ds = make_synthetic_dataset(160, 2, confidence=False)
    ds.responses[:] = np.where(ds.quality > 0, "answer answer alpha", "answer answer gamma")
    aurocs = {}
    for truncation in ("right", "left"):
        module, dm, _, _ = train_tiny(tmp_path / truncation, epochs=30, dataset=ds, answer_max_length=3,
                                      answer_truncation=truncation)
        assert dm.data_config()["answer_truncation"] == truncation
        art = build_artifact(module, dm, strategies=("routing",), budgets_per_pair=1, progress=False)
        loaded = load_artifact(art.save(tmp_path / f"{truncation}.safetensors"))
        assert loaded.answer_truncation == truncation
        test = dm.splits["test"]
        texts = [str(t) for t in test.dataset.responses[:8].ravel()]
        np.testing.assert_allclose(loaded.embed_answers(texts), test.answer_emb[:8].reshape(len(texts), -1),
                                   rtol=1e-5, atol=1e-6)
        aurocs[truncation] = {name: own_answer_auroc(bind_split(loaded, dm.splits[name])[0], dm.splits[name].quality.numpy())
                              for name in ("train", "test")}
        if truncation == "left":
            older = dataclasses.replace(loaded, encoder={k: v for k, v in loaded.encoder.items() if k != "answer_truncation"})
            assert older.answer_truncation == "right"
            assert not np.allclose(older.embed_answers(texts), loaded.embed_answers(texts))
    assert aurocs["left"]["train"] > 0.95 and aurocs["right"]["train"] < 0.85, aurocs  # learnt vs not learnable
    assert aurocs["left"]["test"] > aurocs["right"]["test"] + 0.1, aurocs


def test_unknown_answer_truncation_is_refused():
    from cascade_routing.training.datamodule import RoutingDataModule

    with pytest.raises(ValueError, match="middle"):
        RoutingDataModule(answer_truncation="middle")


def test_a_trained_network_refuses_data_it_cannot_read(trained, tmp_path):
    """A checkpoint run (validate / test / load_from_checkpoint) on another encoder or task list is
    refused with the reason, not a shape error or silently meaningless numbers."""
    import dataclasses

    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from estimators_helpers import make_tiny_encoder

    module, dm, ds = trained["module"], trained["dm"], trained["ds"]
    assert module.hparams.trained_on["task_vocabulary"] == dm.task_vocabulary
    assert module.hparams.trained_on["encoder_fingerprint"]

    def data(dataset=ds, encoder=dm.encoder_path):
        return RoutingDataModule.from_dataset(dataset, encoder_path=str(encoder), cache_dir=str(tmp_path / "cache"),
                                              batch_size=32)

    module.check_data(data())
    with pytest.raises(ValueError, match=r"reads 32-wide query embeddings.*gives 48"):
        module.check_data(data(encoder=make_tiny_encoder(tmp_path / "wide", hidden=48)))
    other = make_tiny_encoder(tmp_path / "other", layers=1)  # same width, different weights
    with pytest.raises(ValueError, match=r"is not the encoder the network was trained with"):
        module.check_data(data(encoder=other))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"is not the encoder the network was trained with"):
        trainer.validate(module, data(encoder=other), verbose=False)
    renamed = dataclasses.replace(ds, tasks=[t.replace("task0", "algebra") for t in ds.tasks])
    with pytest.raises(ValueError, match=r"trained on the tasks \['task0', 'task1', 'task2'\].*'algebra'"):
        module.check_data(data(dataset=renamed))
    with pytest.warns(UserWarning, match=r"trained on dataset 'synthetic-240x3'; running it on 'a-copy'"):
        module.check_data(data(dataset=dataclasses.replace(ds, name="a-copy")))


def test_binding_without_the_tasks_the_estimator_reads_warns(trained):
    import warnings

    from cascade_routing.estimators.features import UnseenTaskWarning

    art, ds = trained["art"], trained["ds"]
    queries = list(ds.queries[:5])
    with pytest.warns(UnseenTaskWarning, match=r"got none: every query's task input is all zero"):
        art.bind(queries)
    with pytest.warns(UnseenTaskWarning, match=r"queries with no task or one the estimator was not trained "
                                               r"on \(\['None', 'algebra'\]"):
        art.bind(queries, tasks=["algebra", "task1", None, "task2", "task0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenTaskWarning)
        art.bind(queries, tasks=list(ds.tasks[:5]))


def test_bind_refuses_a_single_string_or_non_string_queries(trained):
    """A bare string would otherwise bind one query per character; a non-string item (None, a number)
    would be read as its repr."""
    art, ds = trained["art"], trained["ds"]
    with pytest.raises(TypeError, match=r"queries must be a sequence of strings, one per query, got a single str"):
        art.bind("one query")
    with pytest.raises(TypeError, match=r"queries\[1\] is of type NoneType, not str"):
        art.bind([ds.queries[0], None])
    with pytest.raises(TypeError, match=r"tasks must be a sequence of strings.*got a single str"):
        art.bind([ds.queries[0]], tasks=str(ds.tasks[0]))
    from cascade_routing.estimators.features import UnseenTaskWarning

    with pytest.warns(UnseenTaskWarning):  # any sequence; a task may be missing (and is warned about)
        qe, _ = art.bind(tuple(ds.queries[:2]), tasks=[ds.tasks[0], None])
    assert qe.estimate(torch.arange(2), torch.zeros(2, len(art.models), dtype=torch.bool)).mean.shape == (2, 3)
