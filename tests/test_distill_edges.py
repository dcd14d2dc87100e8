"""distill-encoder's edges: bad settings refused before the teacher pass, the report's JSON, the
truncation it trains with, and the CLI's defaults read from the Python API."""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest

import cascade_routing.training.distill as distill
from cascade_routing.estimators import encoding
from cascade_routing.training.distill import StudentConfig, distill_encoder

from estimators_helpers import WORDS
from tests.test_distill import _texts, _tiny_teacher

TINY = StudentConfig(layers=1, hidden=16, heads=2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if the teacher is loaded: the settings must be refused before the slow part."""
    def load(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(distill, "_load_teacher", load)


@pytest.mark.parametrize("kwargs, message", [
    ({"heldout_fraction": 1.0}, r"heldout_fraction must be in \[0, 1\), got 1.0"),
    ({"heldout_fraction": -0.1}, r"heldout_fraction must be in \[0, 1\), got -0.1"),
    ({"heldout_fraction": 0.5, "n": 3}, "holds out 2 and leaves 1 to train on; distillation needs at least 2"),
    ({"truncation": "middle"}, "unknown truncation 'middle'"),
    ({"lr": 0.0}, "learning rate lr > 0, got 0.0"),
])
def test_bad_settings_are_refused_before_the_teacher_pass(tmp_path, no_teacher, kwargs, message):
    """heldout_fraction 1 (or one that leaves a single training text) used to load the teacher, embed
    every text and then fail with "the teacher's embeddings ... are (nearly) identical"; lr 0 trained
    nothing, a bad truncation or negative lr failed only after the teacher pass."""
    kwargs = dict(kwargs)
    texts = _texts(kwargs.pop("n", 20))
    with pytest.raises(ValueError, match=message):
        distill_encoder(texts, tmp_path / "student", str(tmp_path), progress=False, **kwargs)
    assert not (tmp_path / "student").exists()


def test_output_folder_that_is_a_file_or_the_teacher_is_refused_first(tmp_path, no_teacher):
    """A file as ``out`` used to fail with FileExistsError after the teacher pass and the training; the
    teacher's own folder as ``out`` silently overwrote the teacher's weights."""
    (tmp_path / "taken").write_text("not a folder")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for out, message in ((tmp_path / "taken", "taken is a file, not a folder"),
                         (tmp_path / "taken" / "student", "taken is a file, not a folder"),
                         (teacher, "is the teacher's folder")):
        with pytest.raises(ValueError, match=message):
            distill_encoder(_texts(20), out, str(teacher), progress=False)


def test_max_length_beyond_the_teacher_is_refused_before_its_pass(tmp_path, monkeypatch):
    """max_length beyond the tokenizer's model_max_length is named before any text is embedded."""
    teacher = _tiny_teacher(tmp_path / "teacher")
    tok = encoding.load_tokenizer(str(teacher))
    tok.model_max_length = 64
    tok.save_pretrained(teacher)

    def no_targets(*args, **kwargs):
        raise AssertionError("the teacher embedded the texts")

    monkeypatch.setattr(distill, "_teacher_targets", no_targets)
    with pytest.raises(ValueError, match=r"max_length: max_length 100 is more than the encoder accepts \(64"):
        distill_encoder(_texts(20), tmp_path / "student", str(teacher), TINY, max_length=100, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 0}, "heads >= 1"),
    ({"heads": -4}, "heads >= 1"),
    ({"intermediate": 0}, "intermediate .* must be >= 1 or None"),
    ({"intermediate": -3}, "intermediate .* must be >= 1 or None"),
    ({"hidden": 10, "heads": 4}, "not divisible by 4 attention heads"),
])
def test_student_config_refuses_bad_shapes(kwargs, message):
    """heads=0 was a ZeroDivisionError; heads=-4 and intermediate=0 (silently 4 x hidden) were accepted."""
    with pytest.raises(ValueError, match=message):
        StudentConfig(**kwargs)


def test_report_is_strict_json_without_heldout_texts(tmp_path):
    """heldout_fraction=0 wrote NaN into distillation.json, which is not JSON (strict parsers refuse it)."""
    teacher = _tiny_teacher(tmp_path / "teacher")
    res = distill_encoder(_texts(40), tmp_path / "student", str(teacher), TINY, epochs=1, heldout_fraction=0,
                          cache_dir=tmp_path / "cache", progress=False)

    def refuse(name):
        raise ValueError(f"{name} in distillation.json")

    report = json.loads((tmp_path / "student" / "distillation.json").read_text(), parse_constant=refuse)
    assert res.texts_heldout == 0 and res.texts_train == 40
    assert report["heldout_loss_initial"] is None and report["heldout_loss_final"] is None
    assert report["heldout_loss_per_epoch"] == [None]
    assert report["sources"]["heldout_fraction"] == 0


@pytest.mark.parametrize("truncation", ["left", "head_tail"])
def test_student_and_teacher_see_the_tokens_truncation_keeps(tmp_path, monkeypatch, truncation):
    """The student trains on (and the teacher embeds) the tokens ``truncation`` keeps, what the data
    module feeds it with the same ``data.truncation``; there was no such option (always the start)."""
    teacher = _tiny_teacher(tmp_path / "teacher")
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS, size=30)) for _ in range(20)]
    seen = {}

    class Recording(distill._RelativeLoss):
        def __init__(self, net, token_ids, *args):
            seen["ids"] = token_ids
            super().__init__(net, token_ids, *args)

    monkeypatch.setattr(distill, "_RelativeLoss", Recording)
    res = distill_encoder(texts, tmp_path / "student", str(teacher), TINY, epochs=1, max_length=12,
                          cache_dir=tmp_path / "cache", progress=False, truncation=truncation)
    tok = encoding.load_tokenizer(str(teacher))
    assert seen["ids"] == encoding.tokenize(texts, tok, 12, truncation)
    assert seen["ids"] != encoding.tokenize(texts, tok, 12, "right")  # not vacuous: the texts are cut
    cache = encoding.EmbeddingCache(tmp_path / "cache")
    assert cache.path(cache.key(str(teacher), "transformer", 12, texts, truncation)).exists()
    assert res.sources["truncation"] == truncation


def test_train_split_texts_refuses_negative_answers_and_a_split_without_train(tmp_path, monkeypatch):
    """answers=-5 silently took all but 5 answers; a split without "train" was KeyError: 'train'."""
    import cascade_routing.training.datamodule as datamodule

    def no_dataset(name):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr(datamodule, "load_routing_dataset", no_dataset)
    with pytest.raises(ValueError, match="answers .* must be >= 0, got -5"):
        distill.train_split_texts("any", answers=-5)
    with pytest.raises(ValueError, match="has no 'train' part"):
        distill.train_split_texts("any", split={"val": 0.5, "test": 0.5})


def test_cli_defaults_are_the_python_api_defaults(tmp_path, monkeypatch):
    """Every option distill-encoder passes on has the default of the function it reaches, and the
    command passes them all (``--truncation`` did not exist: the API's choice was unreachable)."""
    from cascade_routing.cli import main

    defaults = {name: p.default for fn in (distill.distill_encoder, distill.distill_for_dataset)
                for name, p in inspect.signature(fn).parameters.items()}
    calls = []

    @functools.wraps(distill.distill_for_dataset)  # the same signature, read by the command's registration
    def fake(dataset, out, teacher_path, student, **kwargs):
        calls.append((student, kwargs))
        return distill.DistillResult(str(out), "t", "f", {}, 2, 1, 1, 0, 1.0, 0.5)

    monkeypatch.setattr(distill, "distill_for_dataset", fake)
    assert main(["distill-encoder", "--dataset", "d", "--out", str(tmp_path / "s")]) == 0
    student, kwargs = calls[0]
    assert student == StudentConfig()
    for name in ("split", "split_seed", "answers", "epochs", "batch_size", "lr", "max_length", "seed", "truncation"):
        assert kwargs[name] == defaults[name], name


@pytest.mark.parametrize("extra, message", [
    (["--heads", "0"], "argument --heads: must be at least 1, got 0"),
    (["--intermediate", "0"], "argument --intermediate: must be at least 1, got 0"),
    (["--answers", "-1"], "argument --answers: must be at least 0, got -1"),
    (["--max-length", "0"], "argument --max-length: must be at least 1, got 0"),
    (["--truncation", "middle"], "argument --truncation: invalid choice: 'middle'"),
])
def test_cli_refuses_bad_values_naming_the_option(tmp_path, capsys, extra, message):
    from cascade_routing.cli import main

    with pytest.raises(SystemExit):
        main(["distill-encoder", "--dataset", "d", "--out", str(tmp_path / "s")] + extra)
    assert message in capsys.readouterr().err
