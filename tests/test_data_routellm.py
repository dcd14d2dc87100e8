"""RouteLLM converters (MMLU, GSM8K, MT-Bench) on the real files; prices table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cascade_routing.data import DatasetError, load_dataset
from cascade_routing.data.converters.routellm import (
    DEFAULT_PRICES,
    convert_routellm_gsm8k,
    convert_routellm_mt_bench,
    estimate_tokens,
    load_prices,
    prices_path,
)

MIX, GPT4 = "mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"


@pytest.fixture(scope="module")
def mmlu():
    return load_dataset("routellm-mmlu", progress=False)


@pytest.fixture(scope="module")
def gsm8k():
    return load_dataset("routellm-gsm8k", progress=False)


@pytest.fixture(scope="module")
def mt_bench():
    return load_dataset("routellm-mt-bench", progress=False)


def _mean(ds, model):
    return ds.quality[:, ds.model_index(model)].mean()


def test_mmlu(mmlu) -> None:
    assert mmlu.num_queries == 14042 and mmlu.models == [MIX, GPT4]
    assert round(_mean(mmlu, MIX), 4) == 0.6808 and round(_mean(mmlu, GPT4), 4) == 0.8058
    assert len(set(mmlu.tasks)) == 57 and len(mmlu.metadata["conversion_report"]["files"]) == 57
    assert mmlu.metadata["original_model_names"][MIX] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert "ceil(characters / 4)" in mmlu.metadata["cost_source"]
    i = 0
    expected = (estimate_tokens(mmlu.queries[i]) * 10.0 + 1 * 30.0) / 1e6
    assert mmlu.cost[i, mmlu.model_index(GPT4)] == pytest.approx(expected)
    assert (mmlu.features["tokens_out"] == 1).all()
    assert len(mmlu.metadata["contaminated_query_ids"]) == 5


def test_gsm8k(gsm8k) -> None:
    assert gsm8k.num_queries == 1319
    assert round(_mean(gsm8k, MIX), 4) == 0.6384 and round(_mean(gsm8k, GPT4), 4) == 0.8567
    assert gsm8k.responses is not None and all(isinstance(r, str) and r for r in gsm8k.responses[:, 1])
    j = gsm8k.model_index(MIX)
    t_in, t_out = estimate_tokens(gsm8k.queries[3]), estimate_tokens(gsm8k.responses[3, j])
    assert gsm8k.cost[3, j] == pytest.approx((t_in + t_out) * 0.6 / 1e6)
    assert gsm8k.features["tokens_out"][3, j] == t_out


def test_mt_bench(mt_bench) -> None:
    ds = mt_bench
    assert ds.num_queries == 160 and set(ds.models) == {MIX, GPT4}
    assert ds.quality.min() >= 0 and ds.quality.max() <= 1
    for turn, expected in ((1, {GPT4: 9.406, MIX: 8.694}), (2, {GPT4: 9.050, MIX: 7.988})):
        rows = [i for i, q in enumerate(ds.query_ids) if q.endswith(f"turn{turn}")]
        assert len(rows) == 80
        for model, score in expected.items():
            assert round(ds.quality[rows, ds.model_index(model)].mean() * 9 + 1, 3) == score
    row = ds.query_ids.index("mt-bench/81/turn2")
    assert "[follow-up] Rewrite your previous response" in ds.queries[row]
    assert ds.responses[row, ds.model_index(GPT4)].startswith("A")
    assert len(set(ds.tasks)) == 8


def test_shipped_prices_are_the_defaults() -> None:
    loaded = yaml.safe_load(prices_path().read_text())
    assert loaded["models"] == DEFAULT_PRICES == load_prices()
    # the numbers the converted RouteLLM costs were computed with (prices.yaml states their sources)
    assert DEFAULT_PRICES["gpt-4-1106-preview"] == {"name": "gpt-4-1106-preview", "input": 10.0, "output": 30.0}
    assert DEFAULT_PRICES["mistralai/Mixtral-8x7B-Instruct-v0.1"]["input"] == 0.6


def test_custom_prices_and_missing_price(raw_data_dir: Path, tmp_path: Path) -> None:
    root = raw_data_dir / "routellm"
    doubled = {k: {**v, "input": 2 * v["input"], "output": 2 * v["output"]} for k, v in DEFAULT_PRICES.items()}
    base = convert_routellm_gsm8k(root)
    twice = convert_routellm_gsm8k(root, prices=doubled)
    np.testing.assert_allclose(twice.cost, 2 * base.cost)
    only_gpt4 = {"gpt-4-1106-preview": DEFAULT_PRICES["gpt-4-1106-preview"]}
    with pytest.raises(DatasetError, match="no price for model 'mistralai/Mixtral-8x7B-Instruct-v0.1'"):
        convert_routellm_gsm8k(root, prices=only_gpt4)
    bad = tmp_path / "prices.yaml"
    bad.write_text("models:\n  gpt-4-1106-preview: {input: -1, output: 3}\n")
    with pytest.raises(DatasetError, match="field 'input' must be a number >= 0"):
        load_prices(bad)


def test_mt_bench_bad_score(raw_data_dir: Path, tmp_path: Path) -> None:
    src = raw_data_dir / "routellm/routellm/evals/mt_bench"
    dst = tmp_path / "routellm/evals/mt_bench"
    dst.mkdir(parents=True)
    (dst / "question.jsonl").write_text((src / "question.jsonl").read_text())
    lines = (src / "judgements.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["score"] = 11
    (dst / "judgements.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match=r"judgements\.jsonl line 1, model 'gpt-4-1106-preview', field 'score'"):
        convert_routellm_mt_bench(tmp_path)


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("x" * 401) == math.ceil(401 / 4)
