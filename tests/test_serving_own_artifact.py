"""Serving a user's OWN trained artifact: a CSV of per-query outcomes imported with ``data import``
(``import_table``), ``train.py fit`` with a tiny config, the exported ``.safetensors``, then
``CascadeRouter.from_checkpoint`` + ``create_app`` (the Python API) and ``cascade-routing serve``
(the CLI) with a backends file that does or does not match it.

Startup refuses, naming the file and the models, a backends file without an entry for one of the
checkpoint's models (a typo gets the file's nearest name); it warns about entries the checkpoint
lacks (never called) and about prices that make every request cost far more or less than the
checkpoint's cost model says; the entries' order does not matter. A budget below every fitted one is
an error naming the checkpoint; one above every fitted one warns (the largest one's λ is used). The
exported artifact carries its encoder and tokenizer and starts without the encoder folder; an
encoder or tokenizer folder an artifact refers to and does not carry (one written before tokenizers
were embedded) is an error naming it at startup, not a 500 on every request.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import random
import warnings
from pathlib import Path

import httpx
import pytest
import yaml

from cascade_routing.cli import main as cli_main
from cascade_routing.serving import CascadeRouter
from cascade_routing.serving.backends import BackendPool, parse_backends
from cascade_routing.serving.replay import backends_document
from cascade_routing.serving.server import create_app
from estimators_helpers import WORDS, fit_tiny_artifact, make_tiny_encoder
from tests.serving_helpers import ServingStack

MODELS = ["cheap", "mid", "big"]
PRICE_IN = {"cheap": 1e-7, "mid": 1e-6, "big": 1e-5}  # USD per token, as a provider bills them
PRICE_OUT = {"cheap": 4e-7, "mid": 4e-6, "big": 4e-5}


def _write_runs(path: Path, n: int = 150) -> None:
    """A user's table: per query and model correct or not, the USD cost (tokens x prices), the answer
    and the token counts."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        columns = [f"{m}_{k}" for m in MODELS for k in ("ok", "usd", "text", "tin", "tout")]
        out.writerow(["question", "subject", *columns])
        for i in range(n):
            t = i % 3
            row = [f"task{t} " + " ".join(rng.choice(WORDS[:40]) for _ in range(6)) + f" q{i}", f"task{t}"]
            tin = rng.randint(20, 80)
            for j, m in enumerate(MODELS):
                ok = rng.random() < 0.4 + 0.25 * j
                tout = rng.randint(5, 60)
                row += [str(ok).lower(), repr(tin * PRICE_IN[m] + tout * PRICE_OUT[m]),
                        "answer yes alpha" if ok else "answer no beta", tin, tout]
            out.writerow(row)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """``data import`` of the table, then ``train.py fit`` (1 epoch) on it: the exported artifact."""
    from cascade_routing.data.importer import import_table

    tmp = tmp_path_factory.mktemp("own")
    _write_runs(tmp / "runs.csv")
    mapping = {"query": "question", "task": "subject", "models": MODELS, "quality": "{model}_ok",
               "cost": "{model}_usd", "response": "{model}_text",
               "features": {"tokens_in": "{model}_tin", "tokens_out": "{model}_tout"}}
    data = import_table(tmp / "runs.csv", mapping)
    data.save(tmp / "my-data")
    encoder = make_tiny_encoder(tmp / "encoder")
    artifact = fit_tiny_artifact(tmp, tmp / "my-data", encoder)
    assert artifact.is_file()
    from cascade_routing.estimators.artifact import load_artifact

    art = load_artifact(artifact)
    assert art.models == MODELS and art.cost_model.mode == "tokens"  # per-token prices to compare with
    assert art.encoder.get("carried") == "frozen" and art.tokenizer_files  # the weights and tokenizer travel
    budgets = sorted(art.fitted["cascade_routing"])
    split = data.split(art.data_config["split"], seed=art.data_config.get("split_seed", 0))
    return {"tmp": tmp, "artifact": artifact, "encoder": encoder, "budgets": budgets, "test": split["test"],
            "doc": backends_document(data, "http://127.0.0.1:9")}


def _doc(own, edit=None) -> dict:
    """The backends document ``replay-backend --write-backends`` writes for the data, prices checked
    (``trust_reported_cost: false``), after ``edit(models)``."""
    doc = copy.deepcopy(own["doc"])
    for entry in doc["models"]:
        entry["trust_reported_cost"] = False
    if edit is not None:
        edit(doc["models"])
    return doc


def _start(own, doc: dict, budget: float | None = None) -> list[warnings.WarningMessage]:
    """``create_app`` over the artifact and ``doc`` (as the file ``backends.yaml``); the warnings it
    gave (its exception propagates)."""
    budget = own["budgets"][2] if budget is None else budget
    router = CascadeRouter.from_checkpoint(own["artifact"], budget=budget)
    pool = BackendPool(parse_backends(doc, "backends.yaml"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            create_app(router, pool, budget)
    finally:
        asyncio.run(pool.aclose())
    return caught


def _rename(models: list[dict], old: str, new: str) -> None:
    next(e for e in models if e["name"] == old)["name"] = new


@pytest.mark.parametrize("edit, words", [
    (lambda ms: ms.pop(), ["backends.yaml", "no entry for model(s) ['big']"]),
    (lambda ms: _rename(ms, "mid", "mdi"),
     ["backends.yaml", "no entry for model(s) ['mid']", "the file has ['mdi']", "did you mean 'mdi' for 'mid'?"]),
    (lambda ms: _rename(ms, "big", "Big"), ["backends.yaml", "['big']", "did you mean 'Big' for 'big'?"]),
])
def test_a_checkpoint_model_without_a_backend_entry_is_refused_naming_the_file_and_model(own, edit, words):
    """The error named the models but not the file, nor the file's name that was meant (a typo)."""
    with pytest.raises(ValueError) as err:
        _start(own, _doc(own, edit))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_an_entry_the_checkpoint_lacks_warns_and_the_order_does_not_matter(own):
    """An extra entry was silently ignored; it now warns naming it and the file. Entries in another
    order than the checkpoint's (and a matching file) start without a warning about the backends."""
    def extra(models):
        models.append({**models[0], "name": "extra"})

    caught = [str(w.message) for w in _start(own, _doc(own, extra))]
    assert any("backends.yaml" in m and "['extra'] are not in the checkpoint" in m for m in caught), caught
    for edit in (None, lambda ms: ms.reverse()):
        caught = [str(w.message) for w in _start(own, _doc(own, edit))]
        assert not [m for m in caught if "backends.yaml" in m], caught


def test_prices_far_from_the_checkpoints_cost_model_warn(own):
    """A per-1M price written as ``price_per_input_token`` (1e6 times too high) was served without a
    word: the router's estimates assume the trained prices while every answer costs 1e6 times more.
    Now it warns naming the file, the model and the likely slip; prices as trained do not warn."""
    def per_million(models):
        big = next(e for e in models if e["name"] == "big")
        big["price_per_input_token"] *= 1e6
        big["price_per_output_token"] *= 1e6

    caught = [str(w.message) for w in _start(own, _doc(own, per_million))]
    mismatch = [m for m in caught if "model 'big'" in m]
    assert len(mismatch) == 1 and "backends.yaml" in mismatch[0] and "per-1M price" in mismatch[0], caught
    assert not [m for m in caught if "'cheap'" in m or "'mid'" in m], caught


def test_budgets_outside_the_fitted_table(own):
    """Below every fitted budget: an error naming the checkpoint (it named neither). Above every fitted
    budget: served with the largest one's λ, and now a warning says so. Between fitted budgets (the
    documented rule: the largest fitted budget <= it) and at the top: no warning."""
    budgets = own["budgets"]
    with pytest.raises(ValueError) as err:
        CascadeRouter.from_checkpoint(own["artifact"], budget=budgets[0] / 2)
    assert str(own["artifact"]) in str(err.value) and "smallest fitted budget" in str(err.value)
    with pytest.warns(UserWarning, match="above the largest fitted budget") as caught:
        router = CascadeRouter.from_checkpoint(own["artifact"], budget=budgets[-1] * 10)
    assert router.fitted_for(None)[0] == budgets[-1]
    assert f"{budgets[-1]:.6g}" in str(caught[0].message)
    for budget in ((budgets[1] + budgets[2]) / 2, budgets[-1]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            CascadeRouter.from_checkpoint(own["artifact"], budget=budget)
        assert not [w for w in caught if "fitted budget" in str(w.message)], [str(w.message) for w in caught]


@pytest.fixture
def encoder_gone(own):
    """The encoder folder the artifact was trained with, moved away for the test."""
    away = own["encoder"].with_name("encoder-moved")
    own["encoder"].rename(away)
    try:
        yield str(own["encoder"])
    finally:
        away.rename(own["encoder"])


@pytest.fixture(scope="module")
def older(own) -> Path:
    """The artifact as written before tokenizers were embedded: it carries the encoder's weights but
    refers to its tokenizer folder."""
    from cascade_routing.estimators.artifact import load_artifact

    art = load_artifact(own["artifact"])
    art.tokenizer_files = {}
    return art.save(own["tmp"] / "older.safetensors")


def test_a_missing_encoder_folder_is_refused_at_startup_naming_it(own, older, encoder_gone):
    """An artifact that refers to its tokenizer folder: with the folder gone, the router started and
    answered every request with a 500; now startup refuses, naming it. The exported artifact embeds
    its tokenizer and starts without the folder."""
    with pytest.raises(ValueError, match="tokenizer folder") as err:
        CascadeRouter.from_checkpoint(older, budget=own["budgets"][2])
    assert encoder_gone in str(err.value)
    CascadeRouter.from_checkpoint(own["artifact"], budget=own["budgets"][2])


def _cli_serve(own, backends: Path, budget: float, monkeypatch, checkpoint: Path | None = None) -> int:
    """``cascade-routing serve`` of ``checkpoint`` (default: the exported artifact) in this process; a
    server that passes its startup checks returns at once instead of serving (exit status 0)."""
    from cascade_routing.serving import runner

    monkeypatch.setattr(runner.DrainingServer, "run", lambda self, sockets=None: None)
    return cli_main(["serve", "--checkpoint", str(checkpoint or own["artifact"]), "--backends", str(backends),
                     "--budget", str(budget), "--port", "0", "--store", "memory://", "--torch-threads", "0"])


def test_the_cli_refuses_a_backends_file_and_warns_like_the_api(own, tmp_path, capsys, monkeypatch):
    """``cascade-routing serve`` runs the same checks: the warnings as ``WARNING`` lines, and exit status
    2 with one ``error:`` line naming the file and the model."""
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump(_doc(own, lambda ms: _rename(ms, "mid", "mdi"))))
    assert _cli_serve(own, path, own["budgets"][-1] * 10, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "WARNING BudgetAboveFittedWarning: budget" in err, err
    assert f"error: {path}: no entry for model(s) ['mid']" in err and "did you mean 'mdi'" in err, err
    path.write_text(yaml.safe_dump(_doc(own, lambda ms: ms.reverse())))  # matching, in another order
    assert _cli_serve(own, path, own["budgets"][2], monkeypatch) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_the_cli_refuses_a_missing_encoder_folder(own, older, encoder_gone, tmp_path, capsys, monkeypatch):
    """``serve`` of an artifact that refers to its tokenizer folder started and answered 500 to every
    request; now it exits 2 naming the folder. The exported artifact serves without the folder."""
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump(_doc(own)))
    assert _cli_serve(own, path, own["budgets"][2], monkeypatch, checkpoint=older) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and encoder_gone in err and "Traceback" not in err, err
    assert _cli_serve(own, path, own["budgets"][2], monkeypatch) == 0


def test_the_users_artifact_serves_through_the_replay_of_its_own_data(own):
    """The positive control: the file ``replay-backend`` writes for the data serves the checkpoint
    without warnings, and a query of the held-out split is answered by one of its models."""
    test = own["test"]
    router = CascadeRouter.from_checkpoint(own["artifact"], budget=own["budgets"][2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ServingStack(test, router, budget=own["budgets"][2]) as stack:
            body = {"model": "cascade-routing", "messages": [{"role": "user", "content": test.queries[0]}],
                    "routing": {"task": test.tasks[0]}}
            resp = httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["routing"]["models_run"] and set(resp.json()["routing"]["models_run"]) <= set(MODELS)
    words = ("not in the checkpoint", "USD per 1M", "fitted budget")
    assert not [str(w.message) for w in caught if any(x in str(w.message) for x in words)]
